"""Synthetic face embeddings for tests and benchmarks: realistic (manifold) and isotropic.

Real face embeddings (ArcFace and kin) are L2-normalised 512-d vectors that lie near a
low-dimensional curved manifold: impostor cosines are roughly N(0, 0.08²) with a heavier tail
than a Gaussian, genuine (same person, another capture) cosines are about 0.5–0.7. Isotropic
random vectors are the worst case for HNSW (no structure for the graph to exploit), so a
benchmark on them alone says little about real galleries.

The realistic generator maps a latent ``z ~ N(0, I_24)`` through random Fourier features,
``f(z) = cos(W z + b) - E[cos(W z + b)]`` with ``W ~ N(0, σ²)`` (512 × 24) and ``b ~ U(0, 2π)``,
then normalises. A linear projection of a 24-d latent could not give small impostor cosines
(they would be ~N(0, 1/24)); the cosine nonlinearity spreads the manifold over many more
directions while keeping its intrinsic dimension at 24. ``σ`` is calibrated so that impostor
cosines between a probe and another identity's template have a standard deviation of ~0.08.

Genuine probes are another "capture" of the same identity: the template plus noise orthogonal
to it, scaled so that the cosine to the template is uniform in [0.5, 0.7].

Nothing here is personal data: every vector is drawn from a seeded generator.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Intrinsic dimension of the realistic manifold.
LATENT_DIM = 24
#: Scale of the random frequencies; calibrated for impostor std ≈ 0.08 at dim 512.
FREQUENCY_SCALE = 0.22
#: Genuine cosines (probe against its own template) are drawn uniformly in this range.
GENUINE_RANGE = (0.5, 0.7)
#: Seed of the random map itself: every population drawn from the module shares one manifold.
MAP_SEED = 0x5EED_FACE

Vectors = npt.NDArray[np.float32]

_CHUNK = 65_536


def _feature_map(dim: int) -> tuple[npt.NDArray[np.float64], ...]:
    rng = np.random.default_rng(MAP_SEED + dim)
    w = rng.normal(0.0, FREQUENCY_SCALE, size=(dim, LATENT_DIM))
    b = rng.uniform(0.0, 2.0 * np.pi, size=dim)
    # E_z[cos(w·z + b)] for z ~ N(0, I): subtracting it centres the features, so impostor
    # cosines have mean ≈ 0 instead of the kernel's positive mean.
    mean = np.cos(b) * np.exp(-0.5 * np.sum(w * w, axis=1))
    return w, b, mean


def _normalise(x: npt.NDArray[np.floating]) -> Vectors:
    out = np.asarray(x, dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def identities(n: int, dim: int = 512, seed: int = 0) -> Vectors:
    """``n`` enrolled templates of distinct identities on the realistic manifold.

    Returns an ``(n, dim)`` float32 array of unit vectors. The same ``seed`` gives the same
    identities; different seeds give different people on the same manifold.
    """
    if n < 0 or dim < 8:
        raise ValueError("n must be >= 0 and dim >= 8")
    w, b, mean = _feature_map(dim)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        z = rng.normal(size=(stop - start, LATENT_DIM))
        feats = np.cos(z @ w.T + b) - mean
        out[start:stop] = _normalise(feats)
    return out


def isotropic(n: int, dim: int = 512, seed: int = 0) -> Vectors:
    """``n`` templates drawn uniformly on the unit sphere: the hard case for HNSW."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        out[start:stop] = _normalise(rng.standard_normal((stop - start, dim), dtype=np.float32))
    return out


def genuine_probes(
    templates: npt.NDArray[np.float32],
    seed: int = 1,
    *,
    cosine: tuple[float, float] = GENUINE_RANGE,
) -> Vectors:
    """One genuine probe per template: another capture of the same person.

    Each probe is its template plus noise orthogonal to it, so its cosine to the template is
    drawn uniformly in ``cosine`` (default 0.5–0.7). Works for both generators.
    """
    lo, hi = cosine
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError("cosine range must satisfy 0 < lo <= hi < 1")
    t = np.asarray(templates, dtype=np.float32)
    if t.ndim != 2:
        raise ValueError("templates must be a 2-d array")
    rng = np.random.default_rng(seed)
    out = np.empty_like(t)
    for start in range(0, len(t), _CHUNK):
        stop = min(len(t), start + _CHUNK)
        tt = t[start:stop].astype(np.float64)
        noise = rng.standard_normal(tt.shape)
        noise -= np.sum(noise * tt, axis=1, keepdims=True) * tt
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        target = rng.uniform(lo, hi, size=stop - start)
        scale = np.sqrt(1.0 / target**2 - 1.0)
        out[start:stop] = _normalise(tt + scale[:, None] * noise)
    return out


def strangers(n: int, dim: int = 512, seed: int = 0) -> Vectors:
    """``n`` probes of people who are not enrolled: one capture each of a fresh identity.

    Use these, not :func:`identities`, as non-matching probes. A capture carries the same
    noise as a genuine probe, so its cosines to enrolled templates follow the calibrated
    impostor distribution (std ≈ 0.08). A bare identity is a noiseless template: its
    cosines to other templates have std ≈ 0.12, and against a gallery of thousands it
    crosses the 0.42 watchlist floor most of the time, a false-alert rate no real
    deployment sees.
    """
    return genuine_probes(identities(n, dim, seed), seed=seed + 1)


def impostor_cosines(probes: Vectors, templates: Vectors, pairs: int, seed: int = 2) -> np.ndarray:
    """Cosines of ``pairs`` random probe–template pairs of different identities."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(probes), size=pairs)
    j = rng.integers(0, len(templates), size=pairs)
    keep = i != j
    out: np.ndarray = np.asarray(
        np.einsum("ij,ij->i", probes[i[keep]], templates[j[keep]]), dtype=np.float64
    )
    return out
