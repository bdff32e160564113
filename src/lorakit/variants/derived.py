"""A value derived from some weights, kept for inference while none of them changes.

DoRA's row norms ``||W0 + s·B·A||`` and the expert stacks' grouped-matmul layout of ``A`` and ``B`` are
functions of the weights alone; an inference forward (grad disabled) need not compute them again until a
weight changes. :class:`Derived` keys the value on each tensor's identity (held weakly: a replaced weight
is not kept alive), storage, dtype, shape and autograd version counter, which every in-place write bumps
(optimizer steps, ``copy_``, ``merge``, a load): a changed weight never meets a stale value.

Computed every time instead: with grad enabled (training builds its graph through the computation), for
tensors made under ``inference_mode`` (they keep no version counter), while ``torch.compile`` traces, and in a
``torch.distributed`` run (sharded weights are gathered into place by collectives that need not bump a
version). Copies and pickles of the owner start empty.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class Derived:
    """``get(tensors, compute)``: ``compute()``, or the value kept from the last call on the same, unchanged
    ``tensors`` (see the module docstring for when nothing is kept)."""

    def __init__(self):
        self.refs: list[weakref.ref] | None = None
        self.state: list[tuple] = []
        self.value: Any = None

    def get(self, tensors: tuple[Tensor, ...], compute: Callable[[], Any]) -> Any:
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or _distributed():
            return compute()
        if self.refs is not None and all(ref() is t for ref, t in zip(self.refs, tensors, strict=True)) \
                and self.state == _state(tensors):
            return self.value
        value = compute()
        try:
            self.refs, self.state, self.value = [weakref.ref(t) for t in tensors], _state(tensors), value
        except RuntimeError:  # "Inference tensors do not track version counter"
            self.refs, self.state, self.value = None, [], None
        return value

    def __getstate__(self) -> dict:  # copies start empty (weak references do not copy)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _state(tensors: tuple[Tensor, ...]) -> list[tuple]:
    return [(t.data_ptr(), t.dtype, t.device, t.shape, t._version) for t in tensors]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
