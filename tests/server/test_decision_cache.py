"""The decision cache: a decision reused across the request times and probe qualities its
policy says do not matter, and only across those.

The engine is the real embedded one on the shipped bundles with the bundle tests' fixture
data (a judicial authorisation valid 2026-02-01 to 2026-04-01); the last test is a real
server over mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from centinela.config import Settings
from centinela.policy import (
    Bundle,
    Decision,
    EmbeddedEngine,
    Obligations,
    PolicyService,
    ShadowedDecision,
)
from centinela.policy.testing import Undeclared, load_cases, rfc3339_ns
from centinela.server.decision_cache import (
    DecisionCache,
    canonical_ns,
    changes,
    quality_step,
    reads,
    spans,
)
from centinela.server.demo import World, admin_context, populate, serving_world, ts
from centinela.server.records import SiteRecord
from centinela.server.testing import ServerThread
from centinela.v1 import common_pb2 as c
from centinela.v1 import watchlist_service_pb2 as wpb

SECOND = dt.timedelta(seconds=1)
#: A time inside the fixture authorisation's window.
AT = dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, Any], dict[str, Any]]:
    return load_cases(Bundle.load("interim"))


@pytest.fixture(scope="module")
def muni(fixture: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """A municipal alert search's input (a Rego test case of the interim bundle)."""
    found: dict[str, Any] = fixture[0]["r10_allow_municipality_sees_minimal_fields"]["input"]
    return found


@pytest.fixture(scope="module")
def policy(fixture: tuple[dict[str, Any], dict[str, Any]]) -> PolicyService:
    return PolicyService(EmbeddedEngine(Bundle.load("interim"), fixture[1]))


def _at(inp: dict[str, Any], now: dt.datetime, capture: dt.datetime) -> dict[str, Any]:
    """The case's input at these times, in the server's canonical form."""
    ctx = {**inp["context"], "now": now.isoformat(), "capture_time": capture.isoformat()}
    return {**inp, "context": ctx}


def _utc(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _essence(d: Decision) -> Any:
    return (d.allow, d.reasons, d.obligations, d.details)


def test_a_portico_probe_is_decided_once_for_all_its_times(
    policy: PolicyService, muni: dict[str, Any]
) -> None:
    """A municipal alert search compares no time with anything and the quality with its
    floor only: one evaluation serves a year of probes of any quality above the floor (it
    served one second of one quality step before)."""
    cache = DecisionCache(policy)
    start = AT
    for k in range(50):
        now = start + k * dt.timedelta(days=7, seconds=13)
        doc = _at(muni, now, now - 2 * SECOND)
        doc["probe"] = {**doc["probe"], "quality": (11 + k % 9) / 20}  # 0.55 to 0.95
        got = cache.decide(doc).active
        assert got.allow
        assert _essence(got) == _essence(policy.decide(doc).active)
    assert (cache.misses, cache.hits) == (1, 49)


def test_a_cached_decision_never_outlives_the_authorisation_window_it_read(
    policy: PolicyService, fixture: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """Times around both ends of a judicial authorisation, in random order: every answer
    from the cache is what the engine decides for that very time."""
    cases, dynamic = fixture
    inp = cases["r3_allow_investigator_with_authorisation"]["input"]
    window = dynamic["authorisations"][inp["context"]["authorisation_id"]]
    begin, end = _utc(window["not_before"]), _utc(window["not_after"])
    marks = [begin + k * SECOND for k in (-2, -1, 0, 1, 2)]
    marks += [end + k * SECOND for k in (-2, -1, 0, 1, 2)]
    marks += [begin - dt.timedelta(days=400), begin + dt.timedelta(days=20), end + 9 * SECOND]
    pairs = [(n, c) for n in marks for c in marks if c <= n]
    random.Random(7).shuffle(pairs)
    cache = DecisionCache(policy)
    allowed = 0
    for now, capture in pairs * 2:
        doc = _at(inp, now, capture)
        got = cache.decide(doc).active
        want = policy.decide(doc).active
        assert _essence(got) == _essence(want), (now, capture)
        allowed += got.allow
    assert 0 < allowed < 2 * len(pairs)  # both sides of the window were asked
    assert cache.hits > len(pairs)  # and decisions were reused within it


def test_a_time_in_another_form_is_never_reused(
    policy: PolicyService, muni: dict[str, Any]
) -> None:
    cache = DecisionCache(policy)
    at = AT
    base = _at(muni, at, at)
    base["probe"] = {**base["probe"], "quality": 0.9}
    cache.decide(base)
    others = [
        "2026-03-01T10:00:05Z",  # the engines' form, not the server's
        "2026-03-01T10:00:05.5+00:00",
        "2026-03-01T15:00:05+05:00",
        "2300-03-01T10:00:05+00:00",  # past int64 nanoseconds
        "2026-02-30T10:00:05+00:00",
        "2026-03-01T10:00:60+00:00",
        "",
    ]
    for other in others:
        doc = {**base, "context": {**base["context"], "capture_time": other}}
        assert canonical_ns(other) is None
        key = DecisionCache.key(doc)
        assert [name for name, _ in key.values] == ["context.now", "probe.quality"]
        assert cache.cached(key) is None, other
    assert canonical_ns("2026-03-01T10:00:05+00:00") == rfc3339_ns("2026-03-01T10:00:05Z")


def test_a_quality_is_reused_only_between_the_instants_around_it(
    policy: PolicyService, muni: dict[str, Any]
) -> None:
    """The face floor is 0.5: a decision at 0.9 serves 0.55 and 0.95 but not 0.5 or 1 (the
    instants: decided at themselves alone), 0.45 (R13), a value off the server's 0.05
    steps (rego-cpp would read 0.5000001 as 0.5) or a quality that is not a number."""
    at = AT
    cache = DecisionCache(policy)

    def decide(quality: Any) -> Decision:
        doc = _at(muni, at, at)
        doc["probe"] = {**doc["probe"], "quality": quality}
        got = cache.decide(doc).active
        assert _essence(got) == _essence(policy.decide(doc).active), quality
        return got

    for quality in (0.9, 0.55, 0.95):
        assert decide(quality).allow
    assert cache.misses == 1
    for quality in (1.0, 1, 0.5, 0.5):  # instants: each decided at itself alone
        assert decide(quality).allow
    assert cache.misses == 3
    assert decide(0.45).reasons == ("R13",)
    assert decide(0.5000001).allow  # off the steps: asked again
    decide(0.4999999)  # off the steps: the engine's answer, not 0.45's R13 carried over
    assert decide(1.5).reasons == ("INPUT_MALFORMED",)
    assert decide(True).reasons == ("INPUT_MALFORMED",)  # a bool is not a quality
    assert cache.misses == 8
    assert [quality_step(q) for q in (0.35, 0.399, 0.4999999, 1.0)] == [0.35, 0.35, 0.45, 1.0]


def test_shadow_and_active_spans_intersect_and_undeclared_numbers_pin() -> None:
    t = 1_000

    def decision(instants: dict[str, tuple[int, ...]]) -> Decision:
        return Decision(True, ("R8",), Obligations(), "d", "e", (), instants)

    values = (("context.now", t), ("context.capture_time", t))
    active = decision({"context.now": (900, 1_200), "context.capture_time": ()})
    shadow = decision({"context.now": (950, 1_100)})
    assert spans(ShadowedDecision(active, None), values) == ((900, 1_200), (None, None))
    # The shadow declared nothing for capture_time: that time must stay what it was.
    assert spans(ShadowedDecision(active, shadow), values) == ((950, 1_100), None)
    assert spans(ShadowedDecision(decision({}), None), values) == (None, None)
    # At an instant of either, a decision holds at that value alone.
    pinned = decision({"context.now": (t,), "context.capture_time": ()})
    assert spans(ShadowedDecision(active, pinned), values) == (None, (None, None))


def test_a_policy_that_declares_no_instants_is_asked_again_for_another_second(
    fixture: tuple[dict[str, Any], dict[str, Any]], muni: dict[str, Any]
) -> None:
    """A decision without ``instants`` (an older bundle, another OPA policy) is reused at its
    own times only: the behaviour before instants existed."""
    cache = DecisionCache(
        PolicyService(Undeclared(EmbeddedEngine(Bundle.load("interim"), fixture[1])))
    )
    now = AT
    for k in (0, 0, 1, 1, 0):
        cache.decide(_at(muni, now + k * SECOND, now))
    assert (cache.misses, cache.hits) == (2, 3)


def test_an_input_whose_time_is_blank_does_not_share_the_reusable_ones(
    policy: PolicyService, muni: dict[str, Any]
) -> None:
    now = AT
    cache = DecisionCache(policy)
    assert cache.decide(_at(muni, now, now)).active.allow
    blank = {**muni, "context": {**muni["context"], "now": "", "capture_time": ""}}
    assert cache.cached(DecisionCache.key(blank)) is None
    assert not cache.decide(blank).active.allow  # INPUT_MALFORMED, asked of the engine


def test_clearing_forgets_every_span(policy: PolicyService, muni: dict[str, Any]) -> None:
    now = AT
    cache = DecisionCache(policy)
    cache.decide(_at(muni, now, now))
    cache.clear()
    cache.decide(_at(muni, now + SECOND, now))
    assert cache.misses == 2


def test_changes_name_each_entry_that_differs() -> None:
    old = {
        "sites": {"a": {"active": True}, "b": {"active": True}},
        "authorisations": {"X": {"revoked": False}},
        "models": {"pnp_watchlist": "m1"},
    }
    new = {
        "sites": {"a": {"active": False}, "c": {"active": True}},
        "authorisations": {"X": {"revoked": False}},
        "models": {"pnp_watchlist": "m1"},
    }
    assert changes(old, new) == {"sites": frozenset({"a", "b", "c"})}
    assert changes(old, old) == {}
    # A section that appears or goes, or anything outside the sections: no entry says what.
    assert changes(old, {**new, "models": None}) is None
    assert changes(old, {**old, "extra": 1}) is None


@pytest.fixture
def own_policy(fixture: tuple[dict[str, Any], dict[str, Any]]) -> PolicyService:
    """A policy of this test's own, whose data it changes."""
    return PolicyService(EmbeddedEngine(Bundle.load("interim"), fixture[1]))


def _push(policy: PolicyService, cache: DecisionCache, doc: dict[str, Any]) -> None:
    """What the server does on a change of data (server/components.py)."""
    old = policy.dynamic_data
    policy.set_dynamic_data(doc)
    cache.invalidate(changes(old, doc))


def test_a_change_of_data_drops_only_the_decisions_that_read_it(
    own_policy: PolicyService, fixture: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """A municipal camera's decision read its site; an investigator's, its authorisation
    and the van's site. Each stays while the other's entries change, and is decided again,
    on the new data, once its own change."""
    cases, dynamic = fixture
    muni = _at(cases["r10_allow_municipality_sees_minimal_fields"]["input"], AT, AT)
    investigator = _at(cases["r3_allow_investigator_with_authorisation"]["input"], AT, AT)
    cache = DecisionCache(own_policy)
    assert cache.decide(muni).active.allow
    assert cache.decide(investigator).active.allow
    sites = dynamic["sites"]
    surco = {**sites["surco-cam-001"], "active": False}
    doc = {**dynamic, "sites": {**sites, "surco-cam-001": surco, "new-cam": sites["mira-cam-001"]}}
    _push(own_policy, cache, doc)  # another municipality's cameras
    assert cache.decide(muni).active.allow
    assert cache.decide(investigator).active.allow
    assert (cache.misses, cache.dropped) == (2, 0)

    auths = dynamic["authorisations"]
    revoked = {**auths["AUT-2026-0001"], "revoked": True}
    doc = {**doc, "authorisations": {**auths, "AUT-2026-0001": revoked}}
    _push(own_policy, cache, doc)
    assert cache.decide(muni).active.allow
    assert cache.decide(investigator).active.reasons == ("R3",)  # decided again: revoked
    assert (cache.misses, cache.dropped) == (3, 1)

    doc = {
        **doc,
        "sites": {**doc["sites"], "mira-cam-001": {**sites["mira-cam-001"], "active": False}},
    }
    _push(own_policy, cache, doc)
    assert cache.decide(muni).active.reasons == ("R5",)
    assert cache.decide(investigator).active.reasons == ("R3",)
    assert (cache.misses, cache.dropped) == (4, 2)

    doc = {**doc, "models": {"pnp_watchlist": "another-model:0"}}
    _push(own_policy, cache, doc)  # no models before: the section appeared
    assert cache.decide(muni).active.reasons == ("R5", "R13")  # another model: R13 too
    assert cache.decide(investigator).active.reasons == ("R3",)
    assert cache.misses == 6  # both decided again

    doc = {**doc, "models": {"pnp_watchlist": "another-model:0", "reniec_registry": "x:1"}}
    _push(own_policy, cache, doc)  # the registry's model: the investigator's alone
    assert cache.decide(muni).active.reasons == ("R5", "R13")
    assert cache.decide(investigator).active.reasons == ("R3", "R13")
    assert cache.misses == 7


def test_a_decision_that_does_not_say_what_it_read_goes_at_any_change(
    fixture: tuple[dict[str, Any], dict[str, Any]], muni: dict[str, Any]
) -> None:
    _cases, dynamic = fixture
    policy = PolicyService(Undeclared(EmbeddedEngine(Bundle.load("interim"), dynamic), reads=True))
    cache = DecisionCache(policy)
    cache.decide(_at(muni, AT, AT))
    sites = dynamic["sites"]
    _push(policy, cache, {**dynamic, "sites": {**sites, "new-cam": sites["surco-cam-001"]}})
    cache.decide(_at(muni, AT, AT))
    assert (cache.misses, cache.dropped) == (2, 1)


def test_shadow_and_active_reads_add_up() -> None:
    def decision(reads: dict[str, frozenset[str]] | None) -> Decision:
        return Decision(True, ("R8",), Obligations(), "d", "e", (), {}, reads)

    a = decision({"sites": frozenset({"s1"}), "models": frozenset()})
    b = decision({"sites": frozenset({"s2"}), "authorisations": frozenset({"X"})})
    assert reads(ShadowedDecision(a, b)) == {
        "sites": frozenset({"s1", "s2"}),
        "models": frozenset(),
        "authorisations": frozenset({"X"}),
    }
    assert reads(ShadowedDecision(a, None)) == a.reads
    assert reads(ShadowedDecision(a, decision(None))) is None


def test_a_decision_taken_while_the_data_changes_is_not_kept(
    own_policy: PolicyService,
    muni: dict[str, Any],
    fixture: tuple[dict[str, Any], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The data changes while a decision is being taken (perhaps on the old data): it is
    answered, not stored, even when the change touched nothing it read."""
    _, dynamic = fixture
    cache = DecisionCache(own_policy)
    decide = own_policy.decide

    def decide_while_data_changes(inp: Any, **kwargs: Any) -> ShadowedDecision:
        result = decide(inp, **kwargs)
        sites = dynamic["sites"]
        _push(own_policy, cache, {**dynamic, "sites": {**sites, "x": sites["surco-cam-001"]}})
        return result

    with monkeypatch.context() as m:
        m.setattr(own_policy, "decide", decide_while_data_changes)
        assert cache.decide(_at(muni, AT, AT)).active.allow
    cache.decide(_at(muni, AT, AT))
    assert cache.misses == 2


# ---- over the wire -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serving_world(tmp_path_factory.mktemp("world")) as w:
        yield w


def test_probes_of_one_camera_at_different_times_cost_one_policy_evaluation(
    world: World,
) -> None:
    """Three probes of one camera captured minutes apart: one engine evaluation (three
    before, when the key held the capture time to the second)."""
    cache = world.server.app.components.pipeline.cache
    cache.clear()
    misses = cache.misses
    stub = world.stub("muni-miraflores")
    now = dt.datetime.now(dt.UTC)
    for minutes in (1, 3, 5):
        request = world.face_request(world.genuine(0))
        request.context.capture_time.CopyFrom(ts(now - dt.timedelta(minutes=minutes)))
        assert stub.MatchFace(request, timeout=30).alert
    assert cache.misses - misses == 1


def _register(world: World, site_id: str, municipality: str = "muni-miraflores") -> None:
    site = wpb.Site(
        site_id=site_id, municipality=municipality, region="lima", kind=wpb.SITE_KIND_PORTICO
    )
    world.admin().RegisterSite(
        wpb.RegisterSiteRequest(context=admin_context(), site=site), timeout=30
    )


def test_a_watchlist_write_the_policy_does_not_read_keeps_the_decisions(world: World) -> None:
    """A new requisitoria changes nothing the policy reads, and a new site changes nothing a
    camera's decision read: the cameras' decisions stay (before session 21 every watchlist
    write emptied the cache; before session 22 every new site did)."""
    cache = world.server.app.components.pipeline.cache
    stub = world.stub("muni-miraflores")
    assert stub.MatchFace(world.face_request(world.genuine(0)), timeout=30).alert
    world.admin().CreateRequisition(
        wpb.CreateRequisitionRequest(
            context=admin_context(),
            warrant_id="W-2026-000931",
            issuing_court="Juzgado Penal 3 de Lima",
            offence_category="ROBO_AGRAVADO",
            issued_at=ts(dt.datetime.now(dt.UTC) - dt.timedelta(days=1)),
            expires_at=ts(dt.datetime.now(dt.UTC) + dt.timedelta(days=30)),
            dni="44556677",
            templates=wpb.TemplateSet(
                templates=[
                    c.FaceTemplate(model_id=world.model_id, vector=world.identities[7].tolist())
                ]
            ),
        ),
        timeout=30,
    )
    # (The admin call's own decision may or may not have been cached: counted from here.)
    misses = cache.misses
    # The new requisitoria is matched at once, by the decision already cached.
    assert stub.MatchFace(world.face_request(world.genuine(7)), timeout=30).alert
    assert cache.misses == misses
    _register(world, "mira-cam-931")
    misses = cache.misses
    assert stub.MatchFace(world.face_request(world.genuine(0)), timeout=30).alert
    assert cache.misses == misses


def test_a_change_of_the_site_a_decision_read_is_seen_at_the_next_probe(world: World) -> None:
    """A camera's own site deactivated: its next probe is decided again and refused (R5),
    while another camera's decision stays."""
    cache = world.server.app.components.pipeline.cache
    stub = world.stub("muni-miraflores")
    _register(world, "mira-cam-932")
    here = world.face_request(world.genuine(0), site="mira-cam-932")
    assert stub.MatchFace(here, timeout=30).alert
    assert stub.MatchFace(world.face_request(world.genuine(0)), timeout=30).alert
    misses = cache.misses
    world.admin().DeactivateSite(
        wpb.DeactivateSiteRequest(context=admin_context(), site_id="mira-cam-932"), timeout=30
    )
    after = cache.misses
    with pytest.raises(grpc.RpcError) as refused:
        stub.MatchFace(world.face_request(world.genuine(0), site="mira-cam-932"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "R5" in (refused.value.details() or "")
    assert cache.misses == after + 1
    assert stub.MatchFace(world.face_request(world.genuine(0)), timeout=30).alert
    assert cache.misses == after + 1  # the other camera's decision was kept
    assert after >= misses  # (the admin call's own decision)


def test_two_refreshes_at_once_leave_the_engines_with_the_newer_data(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin write's refresh reads the data, and is slow to push them; a second write
    commits and refreshes meanwhile. The engines must end with the second write's site,
    not the first refresh's older document (one refresh at a time)."""
    c = world.server.app.components
    real = c.records.policy_data
    read, release = threading.Event(), threading.Event()

    def slow_first(*args: Any, **kwargs: Any) -> Any:
        doc = real(*args, **kwargs)
        if not read.is_set():
            read.set()
            release.wait(10)  # the first refresh holds its (soon old) document here
        return doc

    monkeypatch.setattr(c.records, "policy_data", slow_first)
    first = threading.Thread(target=c.refresh_policy_data)
    first.start()
    assert read.wait(10)
    c.records.add_site(SiteRecord("mira-cam-933", "muni-miraflores", "lima", 1, "", True))
    second = threading.Thread(target=c.refresh_policy_data)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # one refresh at a time: it waits for the first
    release.set()
    first.join(10)
    second.join(10)
    assert "mira-cam-933" in c.policy.dynamic_data["sites"]


def test_what_a_change_looks_at_is_what_read_it_and_the_index_stays_bounded(
    policy: PolicyService, muni: dict[str, Any]
) -> None:
    """A change looks only at the inputs whose decisions read a changed entry, and the
    inputs pushed out of the cache leave the index with them."""
    cache = DecisionCache(policy, max_entries=10)

    def at(site: str) -> dict[str, Any]:
        return _at({**muni, "context": {**muni["context"], "site_id": site}}, AT, AT)

    for i in range(30):
        cache.decide(at(f"cam-{i:02d}"))  # unknown sites: refused (R5), each read its site
    assert len(cache._lru) == 10
    assert len(cache._indexed) == 10
    assert {k for (s, k) in cache._by_read if s == "sites"} == {
        f"cam-{i:02d}" for i in range(20, 30)
    }
    cache.invalidate({"sites": frozenset({"cam-25", "cam-05"})})  # cam-05 long gone
    assert cache.dropped == 1
    assert len(cache._lru) == 9
    assert ("sites", "cam-25") not in cache._by_read
    cache.decide(at("cam-29"))
    assert cache.misses == 30  # kept


def test_the_shadow_is_tallied_per_request_when_its_decision_is_reused(tmp_path: Path) -> None:
    """A shadow bundle's comparison counts each request answered, not each evaluation: three
    probes of one camera are one evaluation and three comparisons (one, before session 22)."""
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", shadow_bundle="draft-2026")
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        c = server.app.components
        stub = w.stub("muni-miraflores")
        assert stub.MatchFace(w.face_request(w.genuine(0)), timeout=30).alert
        compared, counts, misses = (
            c.policy.compared(),
            c.policy.disagreements(),
            c.pipeline.cache.misses,
        )
        for _ in range(3):
            assert stub.MatchFace(w.face_request(w.genuine(0)), timeout=30).alert
        assert c.pipeline.cache.misses == misses  # reused
        assert c.policy.compared() == compared + 3
        # draft-2026 wants two confirmations of an alert (R9): each request disagrees
        assert c.policy.disagreements()["R9"] == counts["R9"] + 3
        w.close()
