"""``modules_to_save``: modules trained in full, one copy per adapter, the original kept untouched."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class SavedModule(nn.Module):
    """Holds the original module and a trainable copy of it per adapter; runs the active copy.

    With ``row_names`` set (by ``per_row_adapters``), batch row ``i`` runs the copy of ``row_names[i]``
    (the original where that name is ``None`` or has no copy here). Copies whose outputs differ in their last
    dimension (classification heads of 2 and 3 classes) give one output zero-padded to the widest; the caller
    reads each row's own width.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.row_names: list[str | None] | None = None

    def add_copy(self, name: str) -> nn.Module:
        module = copy.deepcopy(self.original)
        for p in module.parameters():
            p.requires_grad_(True)
        self.copies[name] = module
        return module

    def current(self) -> nn.Module:
        if self.disabled or self.active is None or self.active not in self.copies:
            return self.original
        return self.copies[self.active]

    def forward(self, x: Tensor, *args, **kwargs):
        if self.row_names is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        if len(self.row_names) != x.shape[0]:
            raise ValueError(f"per_row_adapters got {len(self.row_names)} names for a batch of {x.shape[0]} rows")
        parts = []
        for name in dict.fromkeys(self.row_names):
            rows = torch.tensor([i for i, n in enumerate(self.row_names) if n == name], device=x.device)
            module = self.copies[name] if name in self.copies else self.original
            part = module(x[rows], *args, **kwargs)
            if not isinstance(part, Tensor):
                raise TypeError(f"per_row_adapters: modules_to_save module {type(module).__name__} returned "
                                f"{type(part).__name__}; only modules returning one tensor can run per row")
            parts.append((rows, part))
        if parts[0][1].dim() == 1:  # one value per row
            out = parts[0][1].new_empty(x.shape[0])
            for rows, part in parts:
                out[rows] = part
            return out
        shapes = {tuple(part.shape[1:-1]) for _, part in parts}
        if len(shapes) > 1:
            raise ValueError(f"per_row_adapters: the modules_to_save copies return shapes that differ before their "
                             f"last dimension ({sorted(shapes)}); they cannot share a batch")
        width = max(part.shape[-1] for _, part in parts)
        out = parts[0][1].new_zeros(x.shape[0], *parts[0][1].shape[1:-1], width)
        for rows, part in parts:
            out[rows, ..., :part.shape[-1]] = part
        return out
