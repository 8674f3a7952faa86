"""An OPA sidecar that restarts loses what Centinela pushed to it; the engine heals it.

OPA is a stand-in here (tests/policy/_opa_standin.py: its REST API over real HTTP, what was
pushed evaluated by rego-cpp, lost on a restart), because no registry this machine reaches
ships the OPA binary. Until session 22 the loss was healed only by a change of policy data
or a restart of Centinela; in between, every decision was ENGINE_UNAVAILABLE (fail closed,
but down).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from centinela.config import Settings
from centinela.policy import Bundle, OpaServerEngine, PolicyService, opa
from centinela.server.demo import populate
from centinela.server.testing import ServerThread

from ._opa_standin import OpaStandIn


@pytest.fixture
def fake() -> Iterator[OpaStandIn]:
    server = OpaStandIn()
    yield server
    if server.socket.fileno() != -1:
        server.close()


@pytest.fixture
def muni(cases_of: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    cases, dynamic = cases_of("interim")
    return cases["r10_allow_municipality_sees_minimal_fields"]["input"], dynamic


@pytest.fixture
def published(
    fake: OpaStandIn, muni: tuple[dict[str, Any], dict[str, Any]]
) -> tuple[OpaServerEngine, dict[str, Any]]:
    """An engine whose bundle and data are in the stand-in, and a municipal probe's input."""
    inp, dynamic = muni
    engine = OpaServerEngine(fake.url, Bundle.load("interim"), timeout_s=5)
    engine.publish(dynamic)
    return engine, inp


@pytest.mark.parametrize("lost", ["everything", "dynamic", "centinela_config"])
def test_an_opa_that_lost_what_was_pushed_is_published_again_at_the_first_undefined_decision(
    fake: OpaStandIn, published: tuple[OpaServerEngine, dict[str, Any]], lost: str
) -> None:
    """A restart loses modules and data; an OPA that loads its bundle from disk keeps the
    modules and loses the data: the decision is then undefined, not a deny of a camera no
    longer known (R5)."""
    engine, inp = published
    if lost == "everything":
        fake.restart()
    else:
        del fake.data[lost]
        fake.changed()
    decision = engine.decide(inp)
    assert decision.allow, decision.reasons
    assert engine.republished == 1
    assert engine.decide(inp).allow
    assert engine.republished == 1  # healed: nothing more to publish


def test_republishing_is_held_to_once_an_interval_and_denies_meanwhile(
    fake: OpaStandIn, published: tuple[OpaServerEngine, dict[str, Any]]
) -> None:
    engine, inp = published
    fake.restart()
    assert engine.decide(inp).allow
    fake.restart()  # again, within the interval: not pushed to on every call
    assert engine.decide(inp).reasons == ("ENGINE_UNAVAILABLE",)
    assert engine.republished == 1
    engine._last_republish -= opa.REPUBLISH_INTERVAL_S  # the interval has passed
    assert engine.decide(inp).allow
    assert engine.republished == 2


def test_an_opa_that_refuses_the_push_leaves_the_call_denied(
    fake: OpaStandIn, published: tuple[OpaServerEngine, dict[str, Any]]
) -> None:
    engine, inp = published
    fake.restart()
    fake.close()  # gone altogether
    assert engine.decide(inp).reasons == ("ENGINE_UNAVAILABLE",)
    assert engine.republished == 0


def test_the_served_policy_heals_after_an_opa_restart(fake: OpaStandIn, tmp_path: Path) -> None:
    """A server on OPA, with a shadow bundle: OPA holds the active bundle's modules (the
    shadow runs in process, or its modules would replace the active ones), and a MatchFace
    after OPA restarted is answered."""
    settings = Settings(
        data_dir=tmp_path / "d",
        listen="127.0.0.1:0",
        policy_engine="opa",
        opa_url=fake.url,
        shadow_bundle="draft-2026",
    )
    active = Bundle.load("interim")
    with ServerThread(settings) as server:
        policy = server.app.components.policy
        assert policy.active.name == "opa"
        assert policy.shadow is not None
        assert policy.shadow.name == "embedded"
        modules = opa.opa_modules(active.policy_modules)
        assert fake.modules == modules
        w = populate(server, registry=False)
        stub = w.stub("muni-miraflores")
        assert stub.MatchFace(w.face_request(w.genuine(0)), timeout=30).alert
        fake.restart()
        # The decision cache would answer this camera without asking OPA: forget it, as a
        # camera not seen before would.
        server.app.components.pipeline.cache.clear()
        assert stub.MatchFace(w.face_request(w.genuine(0)), timeout=30).alert
        assert fake.modules == modules
        assert "mira-portico-01" in fake.data["dynamic"]["sites"]  # and the data with it
        w.close()


def test_a_server_on_opa_refuses_while_opa_is_gone(fake: OpaStandIn, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "d", listen="127.0.0.1:0", policy_engine="opa", opa_url=fake.url
    )
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        fake.restart()
        fake.close()
        server.app.components.pipeline.cache.clear()
        with pytest.raises(grpc.RpcError) as err:
            w.stub("muni-miraflores").MatchFace(w.face_request(w.genuine(0)), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        w.close()


def test_an_engine_a_reload_replaced_never_publishes_its_bundle_again(
    fake: OpaStandIn, published: tuple[OpaServerEngine, dict[str, Any]]
) -> None:
    """A call still in flight on the engine a reload replaced, meeting an undefined decision,
    must not publish the old bundle over the new one (the audit would name the new digest
    while the sidecar applied the old law); the new engine heals the sidecar itself."""
    old, inp = published
    service = PolicyService(old, run_tests_on_reload=False)
    (result,) = service.reload(active="draft-2026")
    assert result.changed
    draft = opa.opa_modules(Bundle.load("draft-2026").policy_modules)
    assert fake.modules == draft
    fake.restart()
    assert old.decide(inp).reasons == ("ENGINE_UNAVAILABLE",)
    assert old.republished == 0
    assert fake.modules == {}
    new = service.active
    assert isinstance(new, OpaServerEngine)
    assert new.decide(inp).obligations.two_person_confirmation  # draft-2026's
    assert fake.modules == draft


def test_a_reload_that_fails_leaves_the_old_bundle_in_opa_and_its_engine_able_to_heal(
    fake: OpaStandIn, published: tuple[OpaServerEngine, dict[str, Any]], tmp_path: Path
) -> None:
    old, inp = published
    service = PolicyService(old, run_tests_on_reload=False)
    broken = tmp_path / "broken"
    shutil.copytree(Bundle.load("interim").path, broken)
    data = json.loads((broken / "data.json").read_text())
    data["centinela_config"]["pushed_before_the_policy"] = True  # the data go first
    (broken / "data.json").write_text(json.dumps(data))
    (broken / "decision.rego").write_text("package centinela\n\nthis is not rego\n")
    (result,) = service.reload(active=broken)
    assert not result.ok
    assert service.active is old
    # What the failed publication changed is the old engine's again.
    interim = Bundle.load("interim")
    assert fake.modules == opa.opa_modules(interim.policy_modules)
    assert fake.data["centinela_config"] == interim.config
    fake.restart()
    assert old.decide(inp).allow
    assert old.republished == 1
