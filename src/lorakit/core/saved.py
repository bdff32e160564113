"""``modules_to_save``: modules trained in full, one copy per adapter, the original kept untouched."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from .tables import SAVED_ROWS


class SavedModule(nn.Module):
    """Holds the original module and a trainable copy of it per adapter; runs the active copy.

    With ``row_names`` set (by ``per_row_adapters``), batch row ``i`` runs the copy of ``row_names[i]``
    (the original where that name is ``None`` or has no copy here): :data:`~lorakit.core.tables.SAVED_ROWS`.
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
        return SAVED_ROWS[0](self, x, *args, **kwargs)  # lorakit.ops.saved_rows: rows by their copies
