"""The synthetic embedding generators are calibrated like real face embeddings."""

from __future__ import annotations

import numpy as np

from centinela.matcher import synth


def test_realistic_calibration() -> None:
    templates = synth.identities(4000, seed=1)
    probes = synth.genuine_probes(templates, seed=2)
    assert templates.dtype == np.float32
    assert templates.shape == (4000, 512)
    assert np.allclose(np.linalg.norm(templates, axis=1), 1.0, atol=1e-5)
    impostor = synth.impostor_cosines(probes, templates, 50_000)
    assert abs(float(impostor.mean())) < 0.01
    assert 0.07 <= float(impostor.std()) <= 0.09
    genuine = np.einsum("ij,ij->i", templates.astype(np.float64), probes.astype(np.float64))
    assert genuine.min() >= 0.5 - 1e-4
    assert genuine.max() <= 0.7 + 1e-4


def test_realistic_manifold_has_low_intrinsic_dimension() -> None:
    """Most of the variance lies in far fewer than 512 directions (unlike isotropic)."""

    def dims_for_90pct(x: np.ndarray) -> int:
        s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
        return int(np.searchsorted(np.cumsum(s) / s.sum(), 0.9)) + 1

    real = dims_for_90pct(synth.identities(1500, seed=3))
    iso = dims_for_90pct(synth.isotropic(1500, seed=3))
    assert real < iso * 0.75


def test_isotropic_calibration() -> None:
    templates = synth.isotropic(3000, seed=4)
    probes = synth.genuine_probes(templates, seed=5)
    impostor = synth.impostor_cosines(probes, templates, 50_000)
    assert abs(float(impostor.std()) - 1 / np.sqrt(512)) < 0.005


def test_generators_are_deterministic() -> None:
    assert np.array_equal(synth.identities(10, seed=9), synth.identities(10, seed=9))
    assert not np.array_equal(synth.identities(10, seed=9), synth.identities(10, seed=10))
    t = synth.identities(10, seed=9)
    assert np.array_equal(synth.genuine_probes(t, seed=1), synth.genuine_probes(t, seed=1))


def test_strangers_score_like_impostors_against_a_gallery() -> None:
    """Unenrolled captures rarely cross the watchlist floor; bare templates usually would."""
    gallery = synth.identities(2000, seed=5)
    floor = 0.42  # the interim bundle's pnp_watchlist threshold floor
    captures = synth.strangers(400, seed=4242)
    scores = captures @ gallery.T
    assert 0.07 <= float(scores.std()) <= 0.09
    assert float((scores.max(axis=1) >= floor).mean()) < 0.02
    templates = synth.identities(400, seed=4242)
    assert float(((templates @ gallery.T).max(axis=1) >= floor).mean()) > 0.5
