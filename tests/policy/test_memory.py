"""A policy decision must not leak native memory, whatever the process loaded before it.

rego-cpp's library carries its own allocator (snmalloc) and global operator new/delete.
In a process that had loaded libstdc++ first (numpy and hnswlib do, so the server always
had), every decision leaked ~150 KB of native memory: the server grew 1-2 KB per answered
call with the decision cache missing a few times a second. ``rego_native`` now puts libstdc++
in the global symbol scope before regopy loads. Each case runs in a fresh interpreter,
since load order is per process; the figure is RSS, which is what an operator watches.
"""

from __future__ import annotations

import json

import pytest

from ._fresh import run_fresh

DECIDE = """
import json, os
from centinela.policy import Bundle, EmbeddedEngine
from centinela.policy.testing import load_cases

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

bundle = Bundle.load("interim")
cases, dynamic = load_cases(bundle)
inputs = [c["input"] for c in cases.values() if isinstance(c, dict) and "input" in c]
engine = EmbeddedEngine(bundle, dynamic)
for i in inputs * 2:
    engine.decide(i)  # warm: first-use allocations are not a leak
before = rss_kb()
n = 0
while n < 1000:
    for i in inputs:
        engine.decide(i)
        n += 1
print(json.dumps({"decisions": n, "growth_kb": rss_kb() - before}))
"""


@pytest.mark.parametrize(
    "first",
    [
        "import numpy, hnswlib",  # the server's order: the matcher loads libstdc++ first
        "import centinela.policy.rego_native",
    ],
)
def test_decisions_do_not_grow_native_memory(first: str) -> None:
    run = run_fresh(f"{first}\n{DECIDE}", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    # The leak was ~150 KB a decision (~150 MB here); 8 MB leaves room for arenas settling.
    assert figures["growth_kb"] < 8 * 1024, figures


def test_regopy_imported_first_is_refused() -> None:
    run = run_fresh("import regopy\nimport centinela.policy.rego_native")
    assert run.returncode != 0
    assert "regopy was imported before centinela.policy.rego_native" in run.stderr
