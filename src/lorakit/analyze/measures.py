"""The paper's Section 7 measures on plain matrices (float64, no model needed).

- spectrum and effective rank of an update ``ΔW = s·B·A``;
- normalised subspace similarity (eq. 4)::

      φ(A1, A2, i, j) = ||U1[:, :i]ᵀ U2[:, :j]||²_F / min(i, j)        in [0, 1]

  with ``U1, U2`` the right-singular vectors of ``A1, A2`` (Figure 3), 1 where the top-``min(i, j)``
  directions coincide, 0 where the subspaces are orthogonal;
- amplification factor (Section 7.3, Table 7)::

      ||ΔW||_F / ||Uᵀ W0 V||_F        U, V: ΔW's top-r left / right singular vectors

  beside the same projection onto W0's own top-r directions and onto random r-dimensional subspaces.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``s·B·A`` as an ``(out, in)`` matrix: ``A (r, in, ...)`` and ``B (out, r, ...)`` (conv kernels are
    flattened; an embedding's ``A (r, num_embeddings)``, ``B (dim, r)`` gives the map from one-hot inputs)."""
    a, b = A.detach().double().flatten(1), B.detach().double().flatten(1)
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"A has rank {a.shape[0]} but B has {b.shape[1]} columns")
    return scaling * (b @ a)


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values, largest first, in float64."""
    return torch.linalg.svdvals(matrix.detach().double())


def effective_rank(s: Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p = s / sum(s)``: ``k`` for ``k`` equal singular values,
    close to 1 when one direction dominates; 0 for the zero matrix."""
    s = s.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(s: Tensor, fraction: float = 0.9) -> int:
    """The fewest singular directions holding ``fraction`` of ``||ΔW||²_F`` (0 for the zero matrix)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    e = s.double() ** 2
    if e.sum() <= 0:
        return 0
    cum = e.cumsum(0) / e.sum()
    return int((cum < fraction - 1e-12).sum()) + 1


def right_singular_basis(A: Tensor) -> Tensor:
    """Orthonormal columns ``(in, r)``: the right-singular vectors of ``A (r, in, ...)``, by singular value."""
    _, _, vh = torch.linalg.svd(A.detach().double().flatten(1), full_matrices=False)
    return vh.T


def left_singular_basis(matrix: Tensor, r: int) -> Tensor:
    """Orthonormal columns ``(out, r)``: the top-``r`` left-singular vectors of ``matrix``, by singular value."""
    u, _, _ = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return u[:, :r]


def subspace_similarity(U1: Tensor, U2: Tensor) -> Tensor:
    """``phi[i-1, j-1] = ||U1[:, :i]ᵀ U2[:, :j]||²_F / min(i, j)`` for every ``i <= r1``, ``j <= r2``.

    ``U1 (n, r1)`` and ``U2 (n, r2)`` have orthonormal columns, most important first.
    """
    if U1.dim() != 2 or U2.dim() != 2 or U1.shape[0] != U2.shape[0]:
        raise ValueError(f"bases must be (n, r) with the same n, got {tuple(U1.shape)} and {tuple(U2.shape)}")
    m2 = (U1.double().T @ U2.double()) ** 2  # (r1, r2)
    cum = m2.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ||U1_iᵀ U2_j||²_F
    i = torch.arange(1, m2.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, m2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def random_similarity(r1: int, r2: int, n: int) -> Tensor:
    """The expected ``phi`` of uniformly random subspaces of ``R^n``: ``E||U1_iᵀ U2_j||² = i·j/n``, so
    ``phi[i-1, j-1] = max(i, j) / n`` (the chance level a heatmap is read against)."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j).expand(r1, r2) / n


def amplification(delta: Tensor, w0: Tensor, r: int, *, random_draws: int = 10, seed: int = 0) -> dict[str, float]:
    """Section 7.3: how strongly ``ΔW`` amplifies the directions it shares with ``W0``.

    Returns ``delta_norm = ||ΔW||_F``, ``w0_norm``, and ``||Uᵀ W0 V||_F`` for three r-dimensional choices of
    ``(U, V)``: ``proj_delta`` (ΔW's top-r singular vectors), ``proj_w0`` (W0's own) and ``proj_random``
    (random orthonormal, mean of ``random_draws``); ``amplification = delta_norm / proj_delta`` and
    ``amplification_random = delta_norm / proj_random``.
    """
    delta, w0 = delta.detach().double(), w0.detach().double()
    if random_draws < 1:
        raise ValueError(f"random_draws must be >= 1, got {random_draws}")
    if delta.shape != w0.shape:
        raise ValueError(f"ΔW has shape {tuple(delta.shape)} but W0 has {tuple(w0.shape)}")
    r = max(1, min(r, *delta.shape))
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    proj_delta = torch.linalg.matrix_norm(u[:, :r].T @ w0 @ vh[:r].T).item()
    s0 = torch.linalg.svdvals(w0)
    proj_w0 = s0[:r].pow(2).sum().sqrt().item()
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(random_draws):
        qu, _ = torch.linalg.qr(torch.randn(delta.shape[0], r, generator=g, dtype=torch.float64))
        qv, _ = torch.linalg.qr(torch.randn(delta.shape[1], r, generator=g, dtype=torch.float64))
        draws.append(torch.linalg.matrix_norm(qu.T @ w0 @ qv).item())
    proj_random = sum(draws) / len(draws)
    delta_norm = torch.linalg.matrix_norm(delta).item()
    return {"r": r, "delta_norm": delta_norm, "w0_norm": torch.linalg.matrix_norm(w0).item(),
            "proj_delta": proj_delta, "proj_w0": proj_w0, "proj_random": proj_random,
            "amplification": delta_norm / proj_delta if proj_delta > 0 else math.inf,
            "amplification_random": delta_norm / proj_random if proj_random > 0 else math.inf}
