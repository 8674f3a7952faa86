"""Shared helpers of the reliability tests: real servers in subprocesses, offline audit checks.

Nothing here fakes a component: a server started here is the real service (``centinela
serve`` or ``benchmarks/_bench_server.py``) in its own process, so a test can SIGKILL it, and
the audit log is checked with the operator's own commands (``centinela audit export`` and
``centinela audit verify``) on what the dead process left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from centinela.policy.bundle import packaged_root
from centinela.server.testing import spawn_serving

ROOT = Path(__file__).resolve().parents[2]
#: How long a server may take to start (a busy 2-core machine, migrations, index load).
START_TIMEOUT_S = 120.0

_BANNER = re.compile(r"serving on [^\s]+:(\d+) ")


def start_bench_server(
    data_dir: Path, templates: int = 200, database_url: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """``benchmarks/_bench_server.py`` on ``data_dir`` (watchlist of ``templates`` synthetic
    people, R14 ceilings lifted; on ``database_url`` if given, else SQLite); returns the
    process and its port once it serves."""
    port_file = data_dir / "port"
    argv = [sys.executable, str(ROOT / "benchmarks" / "_bench_server.py"), "--data-dir"]
    argv += [str(data_dir), "--templates", str(templates), "--port-file", str(port_file)]
    if database_url:
        argv += ["--database-url", database_url]
    return spawn_serving(
        argv,
        port_file,
        what="bench server",
        timeout_s=START_TIMEOUT_S,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_serve(
    data_dir: Path, log_file: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """``centinela serve`` (the production entry point) on ``data_dir`` and a free loopback
    port; settings come from ``env`` (``CENTINELA_*``). Output goes to ``log_file``."""
    full_env = {**os.environ, "CENTINELA_LOG_LEVEL": "warning", **(env or {})}
    start = log_file.stat().st_size if log_file.exists() else 0
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "centinela.cli",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=out,
            stderr=out,
            env=full_env,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = log_file.read_bytes()[start:].decode(errors="replace")
        found = _BANNER.search(text)
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"server died at start: {text[-2000:]}")
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the server at once: no shutdown hook, no flush, no SERVICE_STOP."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """Stop the server gracefully (SIGTERM); return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def verified_entries(
    data_dir: Path, out_dir: Path, database_url: str | None = None
) -> list[dict[str, Any]]:
    """Export the log offline with ``centinela audit export``, verify the export with
    ``centinela audit verify`` against the log's key, and return the entries.

    Fails the test if either command fails (a log that does not verify).
    """
    cmd = [
        sys.executable,
        "-m",
        "centinela.cli",
        "audit",
        "export",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out_dir),
    ]
    if database_url:
        cmd += ["--database-url", database_url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "centinela.cli",
            "audit",
            "verify",
            str(out_dir),
            "--trusted-key",
            str(out_dir / "log.pub"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return [json.loads(line) for line in (out_dir / "entries.jsonl").read_text().splitlines()]


def lifted_bundle(target: Path) -> Path:
    """A copy of the interim bundle with the R14 rate ceilings lifted (as the benchmark
    server does): a load test is not bulk surveillance, and R14 would shed it."""
    shutil.copytree(packaged_root() / "interim", target)
    doc = json.loads((target / "data.json").read_text())
    for kind in doc["centinela_config"]["rate_ceilings"].values():
        kind.update(caller_per_minute=10**9, site_per_minute=10**9)
    (target / "data.json").write_text(json.dumps(doc))
    return target
