"""Run Python code in a fresh interpreter: native library load order is per process."""

from __future__ import annotations

import subprocess
import sys


def run_fresh(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with this interpreter; output captured as text, never raises."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )
