"""``centinela alerts``: the control-center console against a real server over mTLS."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from centinela.clients import alerts_cli
from centinela.config import Settings
from centinela.server.demo import World, populate
from centinela.server.testing import ServerThread


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", shutdown_grace_s=0.5)
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        yield w
        w.close()


def _conn(world: World, identity: str) -> list[str]:
    return [
        "--server",
        world.server.target,
        "--data-dir",
        str(world.server.settings.data_dir),
        "--identity",
        identity,
    ]


def test_watch_rings_and_takes_a_verdict(world: World) -> None:
    out = io.StringIO()
    args = alerts_cli._parser().parse_args(
        [
            "watch",
            "--confirm",
            "--max",
            "2",
            "--operator",
            "op-serenazgo-00001",
            *_conn(world, "muni-miraflores"),
        ]
    )
    done = threading.Thread(target=lambda: alerts_cli.watch(args, out, ask=lambda _q: "y"))
    done.start()
    time.sleep(1.5)
    resp = world.stub("muni-miraflores").MatchFace(world.face_request(world.genuine(0)), timeout=30)
    done.join(30)
    text = out.getvalue()
    assert resp.candidates[0].alert_id in text
    assert "PENDING" in text
    assert "-> CONFIRMED (1/1 confirmations, actionable" in text
    assert "CONFIRMED" in text.splitlines()[-1]


def test_sightings_json(world: World) -> None:
    world.stub("muni-miraflores").MatchFace(world.face_request(world.genuine(0)), timeout=30)
    out = io.StringIO()
    code = alerts_cli.main(
        [
            "sightings",
            world.wanted_requisition,
            "--json",
            "--operator",
            "op-pnp-invest-0001",
            *_conn(world, "pnp-investigator"),
        ],
        out=out,
    )
    assert code == 0
    doc = json.loads(out.getvalue())
    assert doc["reference"] == world.wanted_requisition
    assert [s["site_id"] for s in doc["sightings"]] == ["mira-portico-01"]


def test_unknown_reference_is_refused_with_exit_3(world: World) -> None:
    out = io.StringIO()
    code = alerts_cli.main(
        ["sightings", "req_00000000000000000000", "--json", *_conn(world, "pnp-investigator")],
        out=out,
    )
    assert code == 3
    assert "error" in json.loads(out.getvalue())
