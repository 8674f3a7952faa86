"""The policy engine's native library must not break hnswlib, whatever is imported first.

``librego_shared.so`` (regopy) carries snmalloc and its own global ``operator new``/
``delete``. A process that imported regopy before hnswlib aborted on freeing the first
``knn_query`` result ("free(): invalid pointer", "double free or corruption"). The first fix
(import hnswlib before regopy) traded the abort for a leak (tests/policy/test_memory.py);
``rego_native`` now puts libstdc++ in the global scope before regopy loads, which fixes
both, and no module imports hnswlib for the policy's sake. Each case runs in a fresh
interpreter, since load order is per process.
"""

from __future__ import annotations

import pytest

from ._fresh import run_fresh

SEARCH = """
import numpy as np
import hnswlib
x = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
index = hnswlib.Index(space="ip", dim=64)
index.init_index(max_elements=50, M=16, ef_construction=50)
index.add_items(x)
for i in range(2000):
    labels, dists = index.knn_query(x[i % 50][None, :], k=5, num_threads=1)
    labels = labels[0][labels[0] >= 0]  # frees the result buffers
print("searched")
"""


@pytest.mark.parametrize(
    "first",
    [
        "import centinela.policy.engine",
        "import centinela.policy.rego_native",
        "import centinela.policy.testing",
        "from centinela.policy import PolicyService",
    ],
)
def test_searching_after_the_policy_engine_was_imported_first(first: str) -> None:
    run = run_fresh(f"{first}\n{SEARCH}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "searched"
