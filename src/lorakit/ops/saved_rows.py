"""``modules_to_save`` under per-row adapters: each group of batch rows runs its adapter's copy.

:class:`~lorakit.core.saved.SavedModule` holds the copies; while ``per_row_adapters`` (or the pool) has set its
``row_names``, core hands the forward to :func:`rows_forward` through :data:`lorakit.core.tables.SAVED_ROWS`
(:func:`register`, called once by ``import lorakit``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.saved import SavedModule
from ..core.tables import SAVED_ROWS


def rows_forward(module: SavedModule, x: Tensor, *args, **kwargs) -> Tensor:
    """Batch row ``i`` runs the copy of ``module.row_names[i]`` (the original where that name is ``None`` or has
    no copy). Copies whose outputs differ in their last dimension (classification heads of 2 and 3 classes) give
    one output ``(n, ..., widest)`` zero-padded to the widest; the caller reads each row's own width."""
    if len(module.row_names) != x.shape[0]:
        raise ValueError(f"per_row_adapters got {len(module.row_names)} names for a batch of {x.shape[0]} rows")
    parts = []
    for name in dict.fromkeys(module.row_names):
        rows = torch.tensor([i for i, n in enumerate(module.row_names) if n == name], device=x.device)
        copy = module.copies[name] if name in module.copies else module.original
        part = copy(x[rows], *args, **kwargs)
        if not isinstance(part, Tensor):
            raise TypeError(f"per_row_adapters: modules_to_save module {type(copy).__name__} returned "
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


def register() -> None:
    """Put :func:`rows_forward` into core's table; calling it again changes nothing."""
    SAVED_ROWS[:] = [rows_forward]
