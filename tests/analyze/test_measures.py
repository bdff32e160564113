"""The Section 7 formulas on constructed matrices whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analyze import (
    amplification,
    delta_weight,
    effective_rank,
    energy_rank,
    random_similarity,
    right_singular_basis,
    subspace_similarity,
)

# float64 throughout: the formulas are exact up to round-off (~1e-15); 1e-10 leaves room for the SVDs.
TOL = 1e-10


def orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_identical_subspaces_have_similarity_one_everywhere():
    U = orthonormal(20, 6, 0)
    phi = subspace_similarity(U, U)
    torch.testing.assert_close(phi, torch.ones(6, 6, dtype=torch.float64), atol=TOL, rtol=0)


def test_orthogonal_subspaces_have_similarity_zero():
    Q = orthonormal(20, 8, 1)
    phi = subspace_similarity(Q[:, :3], Q[:, 3:])
    assert phi.shape == (3, 5)
    assert phi.abs().max() < TOL


def test_nested_subspaces_share_the_top_directions():
    """A1's span is the first 4 of A2's 8 directions: φ(i, j) = 1 whenever i <= j, and i ≤ 4 always."""
    Q = orthonormal(30, 8, 2)
    phi = subspace_similarity(Q[:, :4], Q)
    torch.testing.assert_close(phi, torch.ones(4, 8, dtype=torch.float64), atol=TOL, rtol=0)
    # reversed roles with j < i: ||U1_iᵀ U2_j||² = j (U2_j inside U1_i) -> j / min(i, j) = 1; and a shifted
    # basis that shares half of its directions: φ(2, 2) = 1/2 exactly
    phi_half = subspace_similarity(Q[:, [0, 4]], Q[:, [0, 5]])
    assert phi_half[1, 1].item() == pytest.approx(0.5, abs=TOL)
    assert phi_half[0, 0].item() == pytest.approx(1.0, abs=TOL)


def test_similarity_uses_the_right_singular_vectors_of_A():
    """Two A's with the same row space in another order and scale are the same subspace (φ(r, r) = 1), while
    their top direction is planted: A2's largest singular vector is A1's second one."""
    Q = orthonormal(16, 3, 3)
    A1 = torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ Q.T
    A2 = torch.diag(torch.tensor([7.0, 3.0, 0.5], dtype=torch.float64)) @ Q[:, [1, 0, 2]].T
    phi = subspace_similarity(right_singular_basis(A1), right_singular_basis(A2))
    assert phi[2, 2].item() == pytest.approx(1.0, abs=TOL)
    assert phi[0, 0].item() == pytest.approx(0.0, abs=TOL)
    assert phi[1, 1].item() == pytest.approx(1.0, abs=TOL)


def test_random_similarity_is_the_expected_overlap_of_random_subspaces():
    n, draws = 40, 400
    mean = sum(subspace_similarity(orthonormal(n, 2, s), orthonormal(n, 5, 10_000 + s)) for s in range(draws)) / draws
    # Monte Carlo over 400 draws: the standard error of each entry is < 0.01, so 0.03 is a 3-sigma bound
    torch.testing.assert_close(mean, random_similarity(2, 5, n), atol=0.03, rtol=0)


def test_bad_bases_are_refused():
    with pytest.raises(ValueError, match="same n"):
        subspace_similarity(torch.eye(4), torch.eye(5))


def test_effective_rank_and_energy_rank():
    assert effective_rank(torch.tensor([3.0, 3.0, 3.0, 0.0])) == pytest.approx(3.0, abs=TOL)
    assert effective_rank(torch.tensor([1.0, 0.0])) == pytest.approx(1.0, abs=TOL)
    assert effective_rank(torch.zeros(4)) == 0.0
    s = torch.tensor([3.0, 1.0, 1.0])  # energies 9, 1, 1 of 11
    assert energy_rank(s, 0.8) == 1 and energy_rank(s, 0.9) == 2 and energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3)) == 0
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            energy_rank(s, bad)


def test_delta_weight_flattens_conv_kernels_and_checks_rank():
    A, B = torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
    d = delta_weight(A, B, 0.5)
    torch.testing.assert_close(d, 0.5 * B.flatten(1).double() @ A.flatten(1).double())
    assert d.shape == (5, 27)
    with pytest.raises(ValueError, match="rank"):
        delta_weight(torch.randn(3, 4), torch.randn(5, 2), 1.0)


def test_planted_amplification():
    """W0 = U diag(10, 5, 1, 0.1) Vᵀ; ΔW = 2·u4 v4ᵀ lies on W0's weakest direction: ||Uᵀ W0 V|| = 0.1, factor 20."""
    U, V = orthonormal(6, 4, 4), orthonormal(5, 4, 5)
    w0 = U @ torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)) @ V.T
    delta = 2.0 * U[:, 3:] @ V[:, 3:].T
    out = amplification(delta, w0, r=1, random_draws=50)
    assert out["delta_norm"] == pytest.approx(2.0, abs=TOL)
    assert out["proj_delta"] == pytest.approx(0.1, abs=TOL)
    assert out["amplification"] == pytest.approx(20.0, abs=1e-8)
    assert out["proj_w0"] == pytest.approx(10.0, abs=TOL)  # W0's own top direction
    assert out["w0_norm"] == pytest.approx(math.sqrt(100 + 25 + 1 + 0.01), abs=TOL)
    # random unit directions see W0's energy spread over 6 x 5 dims: E||uᵀ W0 v||² = ||W0||² / 30 ≈ 4.2
    assert 0.3 < out["proj_random"] < 6.0
    # an update on W0's strongest direction amplifies nothing: factor 2 / 10
    top = amplification(2.0 * U[:, :1] @ V[:, :1].T, w0, r=1)
    assert top["amplification"] == pytest.approx(0.2, abs=1e-8)
    with pytest.raises(ValueError, match="shape"):
        amplification(delta, w0.T, r=1)
    with pytest.raises(ValueError, match="random_draws"):
        amplification(delta, w0, r=1, random_draws=0)
