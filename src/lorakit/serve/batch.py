"""The running decode batch of continuous batching: rows join and leave between token steps.

Each row is one request. The batch holds one KV cache for all rows, left-padded to a common width
``W`` (keys/values ``(b, heads, W, head_dim)`` per layer) with an attention mask ``(b, W)`` that is 0 on
padding; row ``i``'s next position is its own count of real tokens. New rows are prefilled together
(left-padded) and their caches concatenated onto the batch; finished rows are dropped and all-padding
columns trimmed. Rows keep their own sampling state (``sampling.RowSampler``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def left_pad(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """``ids (b, T)`` left-padded with ``pad`` and ``mask (b, T)``; T = longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: Tensor) -> Tensor:
    """Position of each column for each row: real tokens count from 0; padding gets 0 (masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def accepts(model, argument: str) -> bool:
    """Whether the model's forward takes ``argument``."""
    import inspect

    return argument in inspect.signature(model.forward).parameters


def cache_argument(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.20) or ``past_key_values``."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def cache_tensors(cache) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (keys, values) of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(tensors: list[tuple[Tensor, Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=tensors)


def _pad_width(t: Tensor, width: int) -> Tensor:
    """Left-pad the sequence dim (-2) of ``t`` with zeros to ``width``."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0)) if t.shape[-2] < width else t


def concat(a: tuple[list, Tensor], b: tuple[list, Tensor]) -> tuple[list, Tensor]:
    """Two (cache tensors, mask) batches as one, left-padded to the wider."""
    (ta, ma), (tb, mb) = a, b
    width = max(ma.shape[1], mb.shape[1])
    tensors = [(torch.cat([_pad_width(ka, width), _pad_width(kb, width)]),
                torch.cat([_pad_width(va, width), _pad_width(vb, width)]))
               for (ka, va), (kb, vb) in zip(ta, tb, strict=True)]
    mask = torch.cat([F.pad(ma, (width - ma.shape[1], 0)), F.pad(mb, (width - mb.shape[1], 0))])
    return tensors, mask


def select(tensors: list, mask: Tensor, keep: list[int]) -> tuple[list, Tensor]:
    """Rows ``keep`` only, columns that are padding in every kept row removed."""
    idx = torch.tensor(keep, dtype=torch.long)
    mask = mask[idx]
    first = int(mask.any(0).nonzero()[0]) if mask.any() else mask.shape[1]
    return [(k[idx, :, first:], v[idx, :, first:]) for k, v in tensors], mask[:, first:]
