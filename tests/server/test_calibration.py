"""CalibrateGallery over mutual TLS, and the warning when a gallery outgrows its calibration.

The server is real (TLS with the dev role certificates, SQLite, the embedded Rego engine,
hnswlib). The baseline is exact: numpy's top-1 over the very templates the gallery holds, so
the threshold the service reports is checked against the definition of FPIR, not against the
service's own arithmetic.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from centinela.config import Settings
from centinela.matcher import synth
from centinela.matcher.calibration import fpir, threshold_for_fpir
from centinela.matcher.store import TemplateRecord
from centinela.server.calibration import CalibrationWatch
from centinela.server.demo import World, populate
from centinela.server.testing import ServerThread, bundle_variant
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb

LISTED = 3_000
STRANGERS = 3_000
TARGET = 0.01


#: The vectors of the module gallery's active entries (the fixture fills it).
_ACTIVE: list[np.ndarray] = []


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("calib"), listen="127.0.0.1:0", shutdown_grace_s=1.0
    )
    with ServerThread(settings) as server:
        w = populate(server)
        components: Any = server.app.components
        listed = synth.identities(LISTED, seed=31)
        components.matcher.store.add_templates(
            "pnp",
            "pnp_watchlist",
            w.model_id,
            [
                TemplateRecord(vector=v, dni=f"6{i:07d}", expires_at=_in_days(30))
                for i, v in enumerate(listed)
            ],
        )
        # One listed person whose entry is no longer active: calibration, like alert mode,
        # searches active entries only (R6), so this one must not count.
        components.matcher.store.add_templates(
            "pnp",
            "pnp_watchlist",
            w.model_id,
            [TemplateRecord(vector=synth.identities(1, seed=32)[0], dni="69999999", active=False)],
        )
        components.matcher.catch_up()
        # What the gallery holds and may hit: the templates added here and the demo's one
        # active requisitoria (the lifted one is inactive).
        _ACTIVE.append(np.vstack([listed, w.identities[0][None, :]]))
        yield w
        w.close()
        _ACTIVE.clear()


def _in_days(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)


def _messages(
    model_id: str,
    vectors: np.ndarray,
    *,
    gallery: c.Gallery.ValueType = c.GALLERY_PNP_WATCHLIST,
    target: float = TARGET,
    batch: int = 1000,
) -> list[mpb.CalibrateGalleryRequest]:
    out = []
    for start in range(0, max(len(vectors), 1), batch):
        msg = mpb.CalibrateGalleryRequest(
            templates=[
                c.FaceTemplate(model_id=model_id, vector=v.tolist())
                for v in vectors[start : start + batch]
            ]
        )
        if start == 0:
            msg.gallery = gallery
            msg.target_fpir = target
            msg.context.reference = "CAL-2026-07"
        out.append(msg)
    return out


def _calibrate(
    world: World, identity: str, messages: Iterable[Any]
) -> mpb.CalibrateGalleryResponse:
    answer: mpb.CalibrateGalleryResponse = world.stub(identity).CalibrateGallery(
        iter(messages), timeout=120
    )
    return answer


def _error(world: World, identity: str, messages: list[Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _calibrate(world, identity, messages)
    return err.value


def _trailer(err: grpc.RpcError, key: str) -> str:
    for k, v in cast(Any, err).trailing_metadata() or ():
        if k == key:
            return str(v)
    return ""


def _field(err: grpc.RpcError) -> str:
    """The field the error names, from its rich status details (google.rpc.ErrorInfo)."""
    for k, v in cast(Any, err).trailing_metadata() or ():
        if k == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(v).details[0].Unpack(info)
            return str(info.metadata.get("field", ""))
    return ""


# ---- what a calibration measures --------------------------------------------------------


def test_owner_calibration_agrees_with_exact_search(world: World) -> None:
    strangers = synth.strangers(STRANGERS, seed=4242)
    answer = _calibrate(world, "pnp-admin", _messages(world.model_id, strangers))

    exact = (_ACTIVE[0].astype(np.float64) @ strangers.T.astype(np.float64)).max(axis=0)
    n = len(strangers)
    assert answer.templates == n
    assert answer.gallery == c.GALLERY_PNP_WATCHLIST
    assert answer.gallery_size == len(_ACTIVE[0])  # active entries only (R6)
    assert answer.target_fpir == pytest.approx(TARGET)
    assert answer.resolved  # 3,000 × 0.01 = 30 false positives at the target
    assert answer.threshold_floor == pytest.approx(0.42)
    assert answer.fpir_at_floor_low <= answer.fpir_at_floor <= answer.fpir_at_floor_high
    assert 0.0 < answer.fpir_at_floor_low < answer.fpir_at_floor_high < 1.0

    # The service measures what its searches do. HNSW misses a stranger's best candidate
    # now and then, and a miss can only lower that stranger's score: the service's rates
    # are at most the exact ones, and short of them by a few strangers in a thousand.
    def close_below(measured: float, exact_rate: float) -> bool:
        return exact_rate - 0.005 <= measured <= exact_rate + 1 / n

    exact_threshold = threshold_for_fpir(exact, TARGET)
    assert exact_threshold - 5e-3 <= answer.threshold <= exact_threshold + 1e-4
    assert close_below(answer.fpir_at_floor, fpir(exact, 0.42))
    # The curve: ascending thresholds, FPIR never rising, each point the exact rate or just under.
    ts = [p.threshold for p in answer.curve]
    rates = [p.fpir for p in answer.curve]
    assert ts == sorted(ts)
    assert len(ts) >= 5
    assert rates == sorted(rates, reverse=True)
    for p in answer.curve:
        assert close_below(p.fpir, fpir(exact, p.threshold)), p.threshold
    assert answer.decision.decision_id.startswith("dec_")
    assert "R8" in answer.decision.rule_ids


def test_a_small_set_is_reported_unresolved(world: World) -> None:
    answer = _calibrate(
        world, "pnp-admin", _messages(world.model_id, synth.strangers(1000, seed=7), target=0.003)
    )
    assert answer.templates == 1000
    assert not answer.resolved  # 1,000 × 0.003 < 10


def test_reniec_calibrates_the_registry(world: World) -> None:
    answer = _calibrate(
        world,
        "reniec",
        _messages(world.model_id, synth.strangers(1000, seed=8), gallery=c.GALLERY_RENIEC_REGISTRY),
    )
    assert answer.gallery == c.GALLERY_RENIEC_REGISTRY
    assert answer.gallery_size == len(world.registry)
    assert answer.threshold_floor == pytest.approx(0.5)


def test_the_audit_entry_holds_aggregates_and_a_keyed_digest_only(world: World) -> None:
    strangers = synth.strangers(1000, seed=9)
    answer = _calibrate(world, "pnp-admin", _messages(world.model_id, strangers))
    audit = world.server.app.components.audit
    entry = json.loads(
        audit.entries(answer.decision.audit_index, answer.decision.audit_index + 1)[0]
    )
    assert entry["type"] == "CALIBRATION"
    assert entry["outcome"] == "CALIBRATED"  # 1,000 × 0.01 = 10 may pass the threshold
    assert entry["decision_id"] == answer.decision.decision_id
    assert entry["refs"]["gallery"] == "pnp_watchlist"
    assert entry["metrics"]["templates"] == 1000
    assert entry["metrics"]["gallery_size"] == answer.gallery_size
    assert entry["digests"]["probe"].startswith("hmac-sha256:")
    text = json.dumps(entry)
    for v in strangers[:5]:
        assert f"{v[0]:.6f}"[:8] not in text  # no template value


def test_a_set_under_the_minimum_is_refused_before_any_search(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spy on the real gallery (it still searches): how many templates reach a search.
    gallery = world.server.app.components.matcher.gallery("pnp_watchlist")
    real, searched = gallery.best_scores, []

    def counting(probes: Any, **kwargs: Any) -> Any:
        searched.extend([1] * len(probes))
        return real(probes, **kwargs)

    monkeypatch.setattr(gallery, "best_scores", counting)
    err = _error(
        world, "pnp-admin", _messages(world.model_id, synth.strangers(999, seed=3), batch=400)
    )
    assert cast(Any, err).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 1,000" in cast(Any, err).details()
    assert searched == []
    answer = _calibrate(
        world, "pnp-admin", _messages(world.model_id, synth.strangers(1000, seed=3), batch=400)
    )
    assert answer.templates == 1000
    assert len(searched) == 1000


def test_one_calibration_runs_at_a_time(world: World) -> None:
    import threading

    release = threading.Event()
    msgs = _messages(world.model_id, synth.strangers(1000, seed=4), batch=500)

    def slow() -> Iterator[mpb.CalibrateGalleryRequest]:
        yield msgs[0]
        release.wait(60)  # the first call holds its turn while its stream is open
        yield from msgs[1:]

    first: list[Any] = []
    runner = threading.Thread(target=lambda: first.append(_calibrate(world, "pnp-admin", slow())))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # until the first call holds the turn: the second is then refused
            try:
                second = _error(world, "reniec", msgs_for_registry(world))
            except pytest.fail.Exception:
                assert time.monotonic() < deadline, "the second calibration was never refused"
                time.sleep(0.05)
                continue
            break
        assert cast(Any, second).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "another calibration is running" in cast(Any, second).details()
    finally:
        release.set()
        runner.join(60)
    assert first[0].templates == 1000
    # Once the first has finished, the turn is free again.
    assert _calibrate(world, "reniec", msgs_for_registry(world)).templates == 1000


def msgs_for_registry(world: World) -> list[mpb.CalibrateGalleryRequest]:
    return _messages(
        world.model_id, synth.strangers(1000, seed=5), gallery=c.GALLERY_RENIEC_REGISTRY
    )


# ---- who may calibrate what ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "gallery", "rule"),
    [
        ("muni-miraflores", c.GALLERY_PNP_WATCHLIST, "R8"),  # not an owner's role
        ("pnp-investigator", c.GALLERY_PNP_WATCHLIST, "R8"),
        ("pnp-admin", c.GALLERY_RENIEC_REGISTRY, "R15"),  # another owner's gallery
        ("reniec", c.GALLERY_PNP_WATCHLIST, "R15"),
    ],
)
def test_only_the_owner_calibrates_its_gallery(
    world: World, identity: str, gallery: c.Gallery.ValueType, rule: str
) -> None:
    before = world.server.app.components.audit.size
    err = _error(
        world, identity, _messages(world.model_id, synth.strangers(20, seed=1), gallery=gallery)
    )
    assert cast(Any, err).code() == grpc.StatusCode.PERMISSION_DENIED
    assert _trailer(err, "x-centinela-rule-ids") == rule
    assert world.server.app.components.audit.size > before  # the denial is audited


# ---- malformed calibrations -------------------------------------------------------------------


def _bad_dimension(world: World) -> list[Any]:
    msgs = _messages(world.model_id, synth.strangers(1500, seed=2))
    msgs[1].templates[3].vector[:] = [1.0] * 8
    return msgs


def _other_model(world: World) -> list[Any]:
    msgs = _messages(world.model_id, synth.strangers(10, seed=2))
    msgs[0].templates[4].model_id = "other-model:0000"
    return msgs


def _not_unit_norm(world: World) -> list[Any]:
    msgs = _messages(world.model_id, synth.strangers(10, seed=2))
    msgs[0].templates[2].vector[:] = [0.5] * len(msgs[0].templates[2].vector)
    return msgs


@pytest.mark.parametrize(
    ("build", "code", "field"),
    [
        (lambda w: [], grpc.StatusCode.INVALID_ARGUMENT, "gallery"),
        (
            lambda w: _messages(w.model_id, np.empty((0, 512)), target=TARGET),
            grpc.StatusCode.INVALID_ARGUMENT,
            "templates",
        ),
        (
            lambda w: _messages(w.model_id, synth.strangers(5), gallery=c.GALLERY_UNSPECIFIED),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gallery",
        ),
        (
            lambda w: _messages(w.model_id, synth.strangers(5), gallery=c.GALLERY_STOLEN_VEHICLES),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gallery",
        ),
        (
            lambda w: _messages(w.model_id, synth.strangers(5), target=1.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target_fpir",
        ),
        (
            lambda w: _messages(w.model_id, synth.strangers(5), target=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target_fpir",
        ),
        (  # a statistic of a set, never a search of a few faces
            lambda w: _messages(w.model_id, synth.strangers(999), batch=400),
            grpc.StatusCode.INVALID_ARGUMENT,
            "templates",
        ),
        (_bad_dimension, grpc.StatusCode.INVALID_ARGUMENT, "templates[1003].vector"),
        (_other_model, grpc.StatusCode.FAILED_PRECONDITION, "templates[4].model_id"),
        (_not_unit_norm, grpc.StatusCode.INVALID_ARGUMENT, "templates[2].vector"),
    ],
)
def test_a_malformed_calibration_names_its_field(
    world: World, build: Any, code: grpc.StatusCode, field: str
) -> None:
    err = _error(world, "pnp-admin", build(world))
    assert cast(Any, err).code() == code
    assert _field(err) == field


# ---- kill switch, and a gallery that outgrew its calibration ----------------------------------


def test_outgrown_gallery_is_reported_and_faces_off_stops_calibration(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bundle = bundle_variant(
        tmp_path,
        "interim",
        {
            "framework.facial_matching_enabled": False,
            "galleries.pnp_watchlist.calibrated_size": 5,
        },
    )
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", policy_bundle=str(bundle))
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        components: Any = server.app.components
        components.matcher.store.add_templates(
            "pnp",
            "pnp_watchlist",
            w.model_id,
            [
                TemplateRecord(vector=v, dni=f"6{i:07d}", expires_at=_in_days(30))
                for i, v in enumerate(synth.identities(9, seed=31))
            ],
        )
        components.matcher.catch_up()
        with pytest.raises(grpc.RpcError) as err:
            _calibrate(w, "pnp-admin", _messages(w.model_id, synth.strangers(5)))
        assert cast(Any, err.value).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "R12" in _trailer(err.value, "x-centinela-rule-ids")

        info = w.stub("pnp-admin").GetServerInfo(mpb.GetServerInfoRequest(), timeout=30)
        (watch,) = [g for g in info.galleries if g.gallery == c.GALLERY_PNP_WATCHLIST]
        assert watch.size == 11  # the demo's two requisitorias (one lifted) and nine more
        assert watch.active == 10  # the lifted one cannot hit
        assert watch.calibrated_size == 5
        # target × searchable entries (the lifted one cannot hit) / calibrated size
        assert watch.expected_fpir == pytest.approx(0.003 * 10 / 5)
        (registry,) = [g for g in info.galleries if g.gallery == c.GALLERY_RENIEC_REGISTRY]
        assert registry.calibrated_size == 0
        assert registry.expected_fpir == 0.0

        capfd.readouterr()
        watcher = CalibrationWatch(server.app.components)
        watcher.check()
        watcher.check()  # once per crossing, not once per check
        logs = capfd.readouterr()
        text = logs.out + logs.err
        assert text.count("gallery.outgrew_calibration") == 1
        assert text.count("gallery.calibration_size_unknown") == 1  # the registry's floor
        w.close()


def test_a_gallery_within_its_calibration_is_not_reported(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bundle = bundle_variant(tmp_path, "interim", {"galleries.pnp_watchlist.calibrated_size": 1})
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", policy_bundle=str(bundle))
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        capfd.readouterr()
        CalibrationWatch(server.app.components).check()
        logs = capfd.readouterr()
        assert "gallery.outgrew_calibration" not in logs.out + logs.err
        w.close()
