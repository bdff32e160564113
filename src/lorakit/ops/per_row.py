"""One batch, one adapter per row: the LoRA update of row ``i`` uses adapter ``names[i]``.

Gathered path (BGMV-style, as Punica / S-LoRA): the adapters in use are stacked once,
``A_s: (n+1, r_max, k)`` and ``B_s: (n+1, d, r_max)`` with the scaling folded into B, slot ``n`` all
zeros for base rows (``None``), ranks zero-padded to ``r_max``. Each row gathers its slot and the
update is two batched matmuls::

    a[i] = x[i] @ A_s[idx[i]].T        # (s, r_max)
    y[i] = a[i] @ B_s[idx[i]].T        # (s, d)

Cost is that of a single adapter of rank r_max, whatever the number of distinct adapters.
``loop_update`` runs each adapter on its own rows: the reference (test oracle) and the path for
convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.layers import LoraConv, LoraEmbedding, LoraLayer


def loop_update(layer: LoraLayer, x: Tensor, names: list[str | None]) -> Tensor:
    """Reference: the LoRA update of each row computed by running its adapter on its rows alone."""
    _check_rows(names, x)
    out = None
    for name in dict.fromkeys(names):
        if name is None or name not in layer.adapters:
            continue
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        adapter = layer.adapters[name]
        xs = x[rows] if not x.is_floating_point() else x[rows].to(adapter.dtype)
        part = adapter(xs)
        if out is None:
            out = part.new_zeros(x.shape[0], *part.shape[1:])
        out = out.index_copy(0, rows, part)
    if out is None:  # every row is a base row
        return torch.zeros((), device=x.device)
    return out


class GatheredUpdate:
    """Per-row LoRA update for one linear-like or embedding layer from stacked, gathered weights.

    Under ``torch.no_grad`` the stacks are built once; with grad enabled they are rebuilt per call
    so that gradients reach every adapter's A and B.
    """

    def __init__(self, layer: LoraLayer, names: list[str | None]):
        used = [n for n in dict.fromkeys(names) if n is not None and n in layer.adapters]
        self.adapters = [layer.adapters[n] for n in used]
        slot = {n: j for j, n in enumerate(used)}  # base rows get the zero slot len(used)
        self.index = torch.tensor([slot.get(n, len(used)) for n in names], device=layer.weight.device)
        self.embedding = isinstance(layer, LoraEmbedding)
        self._cached: tuple[Tensor, Tensor] | None = None

    def stacks(self) -> tuple[Tensor, Tensor]:
        """``A_s: (n+1, r_max, k)``, ``B_s: (n+1, d, r_max)``; scaling folded into B, last slot zero."""
        pairs = [(A, B * adapter.scaling) for adapter in self.adapters for A, B in [adapter.plain_pair()]]
        r_max = max(A.shape[0] for A, _ in pairs)
        A_s = [F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A, _ in pairs]
        B_s = [F.pad(B, (0, r_max - B.shape[1])) for _, B in pairs]
        return torch.stack(A_s + [torch.zeros_like(A_s[0])]), torch.stack(B_s + [torch.zeros_like(B_s[0])])

    def __call__(self, x: Tensor) -> Tensor:
        _check_rows(self.index, x)
        if self._cached is not None:
            A_s, B_s = self._cached
        else:
            A_s, B_s = self.stacks()
            if not torch.is_grad_enabled():
                self._cached = (A_s, B_s)
        b = x.shape[0]
        if self.embedding:  # x holds token ids (b, ...); row i reads columns x[i] of A_s[idx[i]]
            a = A_s.transpose(1, 2)[self.index.view(b, *([1] * (x.dim() - 1))), x].reshape(b, -1, A_s.shape[1])
            lead = x.shape
        else:
            a = x.to(A_s.dtype).reshape(b, -1, x.shape[-1]) @ A_s[self.index].transpose(1, 2)  # (b, s, r_max)
            lead = x.shape[:-1]
        y = a @ B_s[self.index].transpose(1, 2)  # (b, s, d)
        return y.view(*lead, y.shape[-1])


class LoopUpdate:
    """Per-row update by :func:`loop_update` (convolutions, and the layers no row's adapter touches)."""

    def __init__(self, layer: LoraLayer, names: list[str | None]):
        self.layer, self.names = layer, names

    def __call__(self, x: Tensor) -> Tensor:
        return loop_update(self.layer, x, self.names)


def _check_rows(names, x: Tensor) -> None:
    if len(names) != x.shape[0]:
        raise ValueError(f"per_row_adapters got {len(names)} adapter names for a batch of {x.shape[0]} rows")


def make_row_update(layer: LoraLayer, names: list[str | None]) -> GatheredUpdate | LoopUpdate:
    """The per-row update for ``layer``: gathered for linear-like and embedding layers, loop for convs."""
    if isinstance(layer, LoraConv) or not any(n in layer.adapters for n in names if n is not None):
        return LoopUpdate(layer, names)
    return GatheredUpdate(layer, names)
