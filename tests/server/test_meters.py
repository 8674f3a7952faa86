"""The benchmarks' meters of a server's resources, on this machine's real /proc."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from centinela.server.testing import DiskMeter, sectors_written


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
