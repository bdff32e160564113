"""One batch, one adapter per row: the LoRA update of row ``i`` uses adapter ``names[i]``.

Gathered path (BGMV-style, as Punica / S-LoRA): the adapters in use are stacked once,
``A_s: (n+1, r_max, k)`` and ``B_s: (n+1, d, r_max)`` with the scaling folded into B, slot ``n`` all
zeros for base rows (``None``; stacked only when there are some), ranks zero-padded to ``r_max``. Each
row gathers its slot and the update is two batched matmuls::

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

    With grad enabled the stacks are rebuilt per call so that gradients reach every adapter's A and B.
    Under ``torch.no_grad`` / ``inference_mode`` the per-row weights are gathered once and reused by every
    call inside the context (decoding runs the same rows for every new token); they hold ``b`` adapter
    copies per layer (``b * r_max * (k + d)`` values), less than the KV cache of those rows.
    """

    def __init__(self, layer: LoraLayer, names: list[str | None]):
        used = [n for n in dict.fromkeys(names) if n is not None and n in layer.adapters]
        self.adapters = [layer.adapters[n] for n in used]
        slot = {n: j for j, n in enumerate(used)}  # base rows get the zero slot len(used)
        slots = [slot.get(n, len(used)) for n in names]
        self.index = torch.tensor(slots, device=layer.weight.device)
        self.zero_slot = len(used) in slots  # only stacked when some row is a base row
        self.shared = len(used) == 1 and not self.zero_slot  # every row runs one adapter: no gather
        self.embedding = isinstance(layer, LoraEmbedding)
        self._cached: tuple[Tensor, Tensor] | None = None

    def stacks(self) -> tuple[Tensor, Tensor]:
        """``A_s: (n, r_max, k)``, ``B_s: (n, d, r_max)``, scaling folded into B; one more zero slot
        (index ``n``) when some row is a base row."""
        pairs = [(A, B * adapter.scaling) for adapter in self.adapters for A, B in [adapter.plain_pair()]]
        r_max = max(A.shape[0] for A, _ in pairs)
        A_s = [F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A, _ in pairs]
        B_s = [F.pad(B, (0, r_max - B.shape[1])) for _, B in pairs]
        if self.zero_slot:
            A_s, B_s = A_s + [torch.zeros_like(A_s[0])], B_s + [torch.zeros_like(B_s[0])]
        return torch.stack(A_s), torch.stack(B_s)

    def weights(self) -> tuple[Tensor, Tensor]:
        """Right-hand operands: ``A_g: (b, k, r_max)``, ``B_g: (b, r_max, d)`` gathered per row.

        Embeddings keep the whole stack ``A_g: (n, k, r_max)`` (rows read it by token id). With
        ``shared``: ``(k, r_max)`` and ``(r_max, d)``, the one adapter's matrices.
        """
        if self._cached is not None and not torch.is_grad_enabled():  # with grad: fresh, so gradients flow
            return self._cached
        A_s, B_s = self.stacks()
        if self.shared:
            A_g, B_g = A_s[0].T, B_s[0].T
        else:
            A_g = A_s.transpose(1, 2) if self.embedding else A_s[self.index].transpose(1, 2)
            B_g = B_s[self.index].transpose(1, 2)
        if not torch.is_grad_enabled():
            self._cached = (A_g, B_g)
        return A_g, B_g

    def __call__(self, x: Tensor) -> Tensor:
        _check_rows(self.index, x)
        A_g, B_g = self.weights()
        b = x.shape[0]
        if self.embedding:  # x holds token ids (b, ...); row i reads rows x[i] of A_g[idx[i]]
            if self.shared:
                return A_g[x] @ B_g  # (b, ..., d)
            a = A_g[self.index.view(b, *([1] * (x.dim() - 1))), x].reshape(b, -1, A_g.shape[-1])  # (b, s, r_max)
            lead = x.shape
        else:
            x = x.to(A_g.dtype)
            if self.shared:
                return (x @ A_g) @ B_g  # (b, ..., d)
            a = torch.bmm(x.reshape(b, -1, x.shape[-1]), A_g)  # (b, s, r_max)
            lead = x.shape[:-1]
        y = torch.bmm(a, B_g)  # (b, s, d)
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
