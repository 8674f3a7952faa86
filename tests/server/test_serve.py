"""The ``centinela serve`` command: first run, graceful shutdown, insecure-dev guard."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.config import Settings
from centinela.errors import ConfigError
from centinela.server import certs
from centinela.server.app import CentinelaServer
from centinela.server.testing import secure_channel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(target: str, files: certs.TlsFiles, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with secure_channel(target, files) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
        except (grpc.RpcError, FileNotFoundError):
            time.sleep(0.2)
    raise AssertionError("server did not become ready")


def test_first_run_creates_pki_and_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    env = dict(os.environ, CENTINELA_LOG_LEVEL="info")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "centinela.cli",
            "serve",
            "--data-dir",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        files = certs.client_files(data / "certs", "compliance")
        _wait_serving(f"127.0.0.1:{port}", files, time.monotonic() + 60)
        assert oct((data / "certs" / "ca.key").stat().st_mode & 0o777) == "0o600"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "serving on" in out
    assert '"event": "server.stopped"' in err
    assert '"event": "server.heap_frozen"' in err  # start-up's heap is out of every GC pass


def test_insecure_dev_refuses_non_loopback(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, listen="0.0.0.0:0", insecure_dev=True)
    closed: list[bool] = []
    server = CentinelaServer(settings, on_stop=lambda: closed.append(True))

    import asyncio

    with pytest.raises(ConfigError, match="loopback"):
        asyncio.run(server.start())
    assert closed == [True]  # a server that cannot start closes what it was handed


def test_a_taken_port_closes_what_the_server_was_handed(tmp_path: Path) -> None:
    import asyncio

    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"127.0.0.1:{other.getsockname()[1]}"
        server = CentinelaServer(Settings(data_dir=tmp_path, listen=taken), on_stop=close)
        with pytest.raises(ConfigError, match="cannot listen on"):
            asyncio.run(server.start())
    assert closed == [True]


def test_configured_certs_dir_without_files_is_an_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, listen="127.0.0.1:0", certs_dir=tmp_path / "none")
    server = CentinelaServer(settings)

    import asyncio

    with pytest.raises(ConfigError, match=r"server\.crt"):
        asyncio.run(server.start())
