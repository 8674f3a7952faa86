"""Portico mode (``centinela edge watch``): counts that add up, alerts, and a server restart.

Real server threads over mutual TLS; the restart test stops the server and starts a new one on
the same port and data directory while the agent keeps running.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from centinela.clients.client import CentinelaClient
from centinela.clients.edge_cli import main
from centinela.clients.encoder import FaceEncoder
from centinela.clients.portico import Portico, PorticoCounts, PorticoEvent
from centinela.clients.retry import RetryPolicy
from centinela.config import Settings
from centinela.server.testing import ServerThread
from centinela.v1 import match_service_pb2 as mpb

pytestmark = pytest.mark.edge

SITE = "mira-cam-07"


def _drop(src: Path, dst: Path) -> None:
    """Put a frame in place whole, as a camera writer should (write, then rename): the
    portico under test runs with ``settle=0`` and would otherwise read a half-copied file."""
    part = dst.with_suffix(".part")
    shutil.copyfile(src, part)
    os.replace(part, dst)


def _wait_for(condition: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Wait for a behaviour (not a duration): fail only if it never happens."""
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _check_invariants(counts: PorticoCounts, pending: int) -> None:
    assert counts.faces == counts.held_back + counts.probes + counts.drops
    assert counts.probes == counts.answered + pending


def test_watch_once_counts_frames_faces_probes_and_alerts(
    tmp_path: Path,
    photos: dict[str, Path],
    enrol: Callable[[ServerThread], dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", shutdown_grace_s=1.0)
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copyfile(photos["players"], frames / "cam07-0001.jpg")
    shutil.copyfile(photos["gdp"], frames / "cam07-0002.jpg")
    (frames / "cam07-0003.jpg").write_bytes(b"truncated")
    (frames / "notes.txt").write_text("not a frame")
    with ServerThread(settings) as server:
        enrol(server)
        conn = ["--server", server.target, "--data-dir", str(settings.data_dir)]
        code = main(["watch", str(frames), "--site", SITE, "--once", "--json", *conn])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    totals = lines[-1]
    assert totals["event"] == "totals"
    counts = totals["counts"]
    assert code == 10
    assert counts["frames"] == 2
    assert counts["unreadable"] == 1
    assert counts["faces"] == 22 + 5
    assert counts["probes"] == counts["answered"] == 16 + 3
    assert counts["held_back"] == 6 + 2
    assert counts["alerts"] == 1
    assert counts["errors"] == counts["drops"] == counts["pending"] == 0
    alerts = [x for x in lines if x["event"] == "alert"]
    assert len(alerts) == 1
    assert alerts[0]["frame"] == "cam07-0001.jpg"


def test_watch_survives_a_server_restart(
    tmp_path: Path,
    photos: dict[str, Path],
    encoder: FaceEncoder,
    enrol: Callable[[ServerThread], dict[str, str]],
    free_port: int,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", listen=f"127.0.0.1:{free_port}", shutdown_grace_s=1.0
    )
    frames = tmp_path / "frames"
    frames.mkdir()
    events: list[PorticoEvent] = []
    first = ServerThread(settings).start()
    second: ServerThread | None = None
    try:
        enrol(first)
        client = CentinelaClient.from_data_dir(
            settings.data_dir,
            "muni-miraflores",
            server=first.target,
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.5),
        )
        portico = Portico(
            client,
            encoder,
            frames,
            site_id=SITE,
            listener=events.append,
            poll_interval=0.05,
            settle=0.0,
            reconnect=RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.5),
        )
        runner = threading.Thread(target=portico.run, daemon=True)
        runner.start()
        _drop(photos["yaoming"], frames / "f-0001.jpg")
        _wait_for(lambda: portico.counts.answered == 1, "first frame answered")
        first.stop()
        _drop(photos["gdp"], frames / "f-0002.jpg")
        _wait_for(lambda: any(e.kind == "disconnect" for e in events), "disconnection seen")
        second = ServerThread(settings).start()
        _wait_for(lambda: portico.counts.answered == 1 + 3, "second frame answered after restart")
        _drop(photos["players"], frames / "f-0003.jpg")
        _wait_for(lambda: portico.counts.answered == 1 + 3 + 16, "third frame answered")
        portico.stop()
        runner.join(30)
        client.close()
    finally:
        if second is not None:
            second.stop()
        first.stop()
    counts = portico.counts
    assert counts.frames == 3
    assert counts.alerts == 2  # the portrait and the team photo
    assert counts.reconnects >= 1
    assert counts.errors == 0
    _check_invariants(counts, portico.pending)


def test_unanswered_probes_are_resent_unchanged(
    tmp_path: Path, encoder: FaceEncoder, server: ServerThread, photos: dict[str, Path]
) -> None:
    """After a broken connection, a re-send carries the same sequence and request id, so the
    server's idempotency answers it without deciding twice."""
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copyfile(photos["gdp"], frames / "a.jpg")
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target
    ) as client:
        portico = Portico(client, encoder, frames, site_id=SITE, settle=0.0)
        portico.scan_once()
        broken = threading.Event()
        outgoing = portico._outgoing(broken)
        first_round = [next(outgoing) for _ in range(3)]
        broken.set()
        resent = portico._outgoing(threading.Event())
        second_round = [next(resent) for _ in range(3)]

    def key(msg: mpb.StreamMatchRequest) -> tuple[int, str]:
        return msg.sequence, msg.face.context.client_request_id

    assert [key(m) for m in second_round] == [key(m) for m in first_round]
    assert len({m.face.context.client_request_id for m in first_round}) == 3


def test_a_full_queue_drops_probes_and_counts_them(
    tmp_path: Path, encoder: FaceEncoder, server: ServerThread, photos: dict[str, Path]
) -> None:
    """Back-pressure: with no stream draining the queue, probes beyond its size are dropped,
    counted and reported, never silently lost."""
    events: list[PorticoEvent] = []
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target
    ) as client:
        portico = Portico(
            client, encoder, tmp_path, site_id=SITE, max_queue=1, listener=events.append
        )
        portico.process_frame(photos["gdp"])
    counts = portico.counts
    assert (counts.faces, counts.held_back, counts.probes, counts.drops) == (5, 2, 1, 2)
    assert [e.face for e in events if e.kind == "drop"] == [2, 3]
    _check_invariants(counts, portico.pending)
