"""Baselines of the paper's tables that are not lorakit features (the Houlsby bottleneck adapter), and the
results writer the experiment scripts share."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def write_json(path: Path, data) -> None:
    """``data`` as JSON at ``path``, written to a temporary name and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


class Bottleneck(nn.Module):
    """Houlsby et al. (2019) adapter: ``h + up(gelu(down(h)))``, ``up`` zero-initialised (starts as identity)."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, size), nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(nn.functional.gelu(self.down(h)))


def add_houlsby(model: nn.Module, suffixes: tuple[str, ...], dim: int, size: int) -> list[nn.Module]:
    """A :class:`Bottleneck` on the output of every module whose path ends with one of ``suffixes`` (Houlsby's
    places: after each block's attention output projection and after its FFN), via a forward hook; the
    bottleneck is registered as the module's child ``houlsby`` so ``parameters()`` and ``.to()`` see it."""
    hits = [m for name, m in model.named_modules() if name.endswith(suffixes)]
    for m in hits:
        m.add_module("houlsby", Bottleneck(dim, size))
        m.register_forward_hook(_apply_bottleneck)
    return hits


def _apply_bottleneck(module: nn.Module, inputs, output):
    return module.houlsby(output)
