"""Layer types beyond the base case: LoRA on ``nn.Embedding`` and on ``nn.Conv1d/2d/3d``.

Core wraps ``nn.Linear`` (and GPT-2's ``Conv1D``) itself; these join its layer table
(:data:`lorakit.core.tables.LAYER_TYPES`) through :func:`register`, which ``import lorakit`` calls once
(importing a module here registers nothing). They sit beside core, as ``ops`` does: ``variants`` and ``ops``
may use them, core never names them.
"""

from __future__ import annotations

from torch import nn

from ..core.tables import LAYER_TYPES
from .conv import LoraConv
from .embedding import LoraEmbedding


def _embedding(module: nn.Module) -> type | None:
    return LoraEmbedding if isinstance(module, nn.Embedding) else None


def _conv(module: nn.Module) -> type | None:
    return LoraConv if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) else None


def register() -> None:
    """Put the embedding and convolution wrappers into core's layer table; calling it again changes nothing."""
    for fits in (_embedding, _conv):
        if fits not in LAYER_TYPES:
            LAYER_TYPES.append(fits)


__all__ = ["LoraConv", "LoraEmbedding", "register"]
