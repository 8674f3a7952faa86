"""The benchmarks' meters of a server's resources, on this machine's real /proc."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from centinela.audit.entry import AuditEvent, EventType
from centinela.audit.log import AuditLog
from centinela.server.testing import (
    AuditMeter,
    CpuMeter,
    DiskMeter,
    LoopMeter,
    cpu_s,
    sectors_written,
)
from centinela.storage import make_engine


def test_disk_meter_counts_what_is_written_and_synced_under_its_path(tmp_path: Path) -> None:
    if sectors_written(tmp_path) is None:
        pytest.skip("/proc/diskstats does not list the device under the test's temp dir")
    meter = DiskMeter(tmp_path)
    with open(tmp_path / "blob", "wb") as f:
        for _ in range(16):
            f.write(os.urandom(256 * 1024))
        f.flush()
        os.fsync(f.fileno())
    # 4 MiB went to the device, over two "calls"; anything else the machine wrote meanwhile
    # only adds to it.
    assert meter.read(2) >= 2048


def test_disk_meter_says_nan_when_nothing_was_answered(tmp_path: Path) -> None:
    assert math.isnan(DiskMeter(tmp_path).read(0))


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_meter_counts_every_thread_and_loop_meter_the_main_one_alone() -> None:
    """What ``match_e2e.py``'s CPU budget rests on: the audit writer's and the searches' CPU
    is the server's too, while the loop's figure is its main thread's alone."""
    if not cpu_s(os.getpid()):
        pytest.skip("no /proc here")
    whole, loop = CpuMeter(os.getpid()), LoopMeter(os.getpid())
    worker = threading.Thread(target=_burn, args=(0.4,))
    worker.start()
    worker.join()  # the main thread waits: it spends (almost) nothing meanwhile
    per_call, cores = whole.read(4)
    assert per_call >= 0.3 * 1000 / 4  # 400 ms over 4 "calls", less a clock tick or two
    assert 0 < cores <= os.cpu_count()  # type: ignore[operator]
    loop_per_call, _ = loop.read(4)
    assert math.isnan(loop_per_call) or loop_per_call < 0.1 * 1000 / 4


def test_cpu_meter_says_nan_per_call_when_nothing_was_answered() -> None:
    if not cpu_s(os.getpid()):
        pytest.skip("no /proc here")
    meter = CpuMeter(os.getpid())
    _burn(0.05)
    assert math.isnan(meter.read(0)[0])


def test_audit_meter_counts_the_entries_a_phase_added_per_answer(tmp_path: Path) -> None:
    """How match_e2e tells a worked answer (one audit entry each) from a replayed one."""
    db = tmp_path / "centinela.db"
    engine = make_engine(f"sqlite:///{db}")
    log = AuditLog.open(engine, Ed25519PrivateKey.generate(), checkpoint_every_seconds=3600)
    try:
        log.append_blocking(AuditEvent(EventType.DENIAL, outcome="DENIED", rule_ids=("R5",)))
        meter = AuditMeter(db)
        for _ in range(3):
            log.append_blocking(AuditEvent(EventType.DENIAL, outcome="DENIED", rule_ids=("R5",)))
        assert meter.read(3) == 1.0  # three answers, each worked and audited
        assert meter.read(6) == 0.5  # six answers, three of them without an entry: replays
    finally:
        log.close()
        engine.dispose()
    assert math.isnan(AuditMeter(tmp_path / "missing.db").read(3))
