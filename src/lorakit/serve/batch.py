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
from transformers.cache_utils import DynamicCache, DynamicLayer


def left_pad(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """``ids (b, T)`` left-padded with ``pad`` and ``mask (b, T)``; T = longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
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


def make_cache(tensors: list[tuple[Tensor, Tensor]]) -> DynamicCache:
    """A transformers ``DynamicCache`` over ``tensors`` whose layers append in place (:class:`SpareLayer`)."""
    cache = DynamicCache()
    cache.layers = [SpareLayer(k, v) for k, v in tensors]
    return cache


def spare_columns(width: int) -> int:
    """Free columns a cache of ``width`` keeps after its last: at least 16, at most an eighth more memory."""
    return max(16, width // 8)


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` over ``keys``/``values`` ``(b, heads, W, head_dim)`` that appends in place.

    transformers' ``DynamicLayer.update`` concatenates, so every decode step copies all ``W`` columns of
    every layer (a fifth of a small model's step in a profile on a busy CPU; at 1,024-token prompts the
    engine ran 1.19x ``generate()`` with this layer, 1.02x with transformers'). Here ``keys``/``values`` are
    views of buffers with :func:`spare_columns` free columns after ``W``: a step writes its own column, and
    only a full buffer is copied (into one with new free columns): a few columns a step instead of ``W``.
    """

    def __init__(self, keys: Tensor, values: Tensor):
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True
        self.buffers = (keys, values)  # adopted as they are: the first step that does not fit makes room

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        used, new = self.keys.shape[-2], key_states.shape[-2]
        if used + new > self.buffers[0].shape[-2]:
            columns = used + new + spare_columns(used + new)
            self.buffers = (_with_columns(self.keys, columns), _with_columns(self.values, columns))
        for buf, states in zip(self.buffers, (key_states, value_states), strict=True):
            buf[..., used:used + new, :] = states
        self.keys, self.values = (buf[..., :used + new, :] for buf in self.buffers)
        return self.keys, self.values


def _with_columns(t: Tensor, columns: int) -> Tensor:
    """A new ``(..., columns, d)`` buffer whose first columns hold ``t`` ``(..., W, d)``; the rest is unset."""
    buf = t.new_empty((*t.shape[:-2], columns, t.shape[-1]))
    buf[..., :t.shape[-2], :] = t
    return buf


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
    if keep == list(range(mask.shape[0])) and bool(mask[:, 0].any()):
        return tensors, mask  # every row, no padding-only column: nothing to copy
    idx = torch.tensor(keep, dtype=torch.long)
    mask = mask[idx]
    first = int(mask.any(0).nonzero()[0]) if mask.any() else mask.shape[1]
    return [(k[idx, :, first:], v[idx, :, first:]) for k, v in tensors], mask[:, first:]
