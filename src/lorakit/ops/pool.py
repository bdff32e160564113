"""A resident pool of stacked adapters (S-LoRA's unified pool): a new batch composition costs an index.

:func:`~lorakit.ops.per_row.per_row_adapters` stacks the adapters it is given on entry, every layer, every
time. A server whose batch changes at every decode step (continuous batching) cannot pay that per step.
:class:`AdapterPool` keeps every loaded adapter's weights stacked per layer, once, in slots::

    A_t: (slots + 1, k, r_max)     B_t: (slots + 1, r_max, d)     scaling folded into B_t

slot ``slots`` (the last) all zeros for base rows. Adding an adapter writes its slot; removing it zeroes
the slot for reuse; the stacks grow (once, by doubling) when slots or ``r_max`` run out. A batch
composition -- adapter ``names[i]`` for row ``i`` -- is then an index tensor of slots, and
:meth:`AdapterPool.rows` puts a :class:`~lorakit.ops.per_row.RowPlan` reading :class:`PoolWeights` on every
layer: per forward, row ``i`` reads its slot's matrices by index (``A_t[idx]``: ``b`` rows gathered,
independent of how many adapters are resident) and the update is the BGMV pair of batched matmuls,
:func:`lorakit.ops.per_row.bgmv`::

    a[i] = x[i] @ A_t[idx[i]]      # (s, r_max)
    y[i] = a[i] @ B_t[idx[i]]      # (s, d)

When every row runs one adapter the slot's matrices are used directly (the one-adapter speed).

DoRA adapters are pooled too: the base is frozen, so each one's per-output factor ``m / ||W0 + s·B·A||`` is
computed once, at :meth:`AdapterPool.add`, and kept in ``S_t: (slots + 1, d)`` (1 elsewhere); a batch with
DoRA rows applies it per row (:func:`lorakit.ops.per_row.scaled_output`), a batch without skips it.

The pool is a snapshot for inference: if an adapter's weights change after :meth:`AdapterPool.add`,
call :meth:`AdapterPool.add` again (it rewrites the slot). Linear-like and embedding layers are pooled;
convolutions, and adapters that act on their rows alone without a ``B·A`` to stack (``row_wise``: trainable
tokens), run :func:`lorakit.ops.per_row.loop_output` on the rows of each adapter (reading the adapter itself,
not a snapshot); a layer that routes rows itself (``routes_rows``: MoE experts) gets the rows' names
(:class:`~lorakit.ops.per_row.RoutedRows`) and reads its adapters' factors live.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..core.layers import LoraLayer, changed_base
from ..core.model import adapter_names, wrappers
from .per_row import (
    LoopUpdate,
    RoutedRows,
    RowPlan,
    ZeroUpdate,
    block_rows_checked,
    routed_blocks,
    row_batched,
    row_wise,
)


class _LayerStack:
    """One layer's resident stacks; ``A_t: (slots+1, k, r)``, ``B_t: (slots+1, r, d)``, and DoRA's per-output
    factors ``S_t: (slots+1, d)`` (1 for plain LoRA, base rows and free slots)."""

    def __init__(self, layer: LoraLayer, slots: int, rank: int):
        w = next(iter(layer.adapters.values())).lora_B.weight
        A, B = next(iter(layer.adapters.values())).plain_pair()
        self.k, self.d = A.shape[1], B.shape[0]
        self.embedding = layer.takes_ids
        self.A_t = torch.zeros(slots + 1, self.k, rank, dtype=w.dtype, device=w.device)
        self.B_t = torch.zeros(slots + 1, rank, self.d, dtype=w.dtype, device=w.device)
        self.S_t = torch.ones(slots + 1, self.d, dtype=w.dtype, device=w.device)
        self.present: set[int] = set()  # slots that hold an adapter on this layer
        self.scaled: set[int] = set()  # slots whose factors are not all 1 (DoRA)

    def resize(self, slots: int, rank: int) -> None:
        A_t = self.A_t.new_zeros(slots + 1, self.k, rank)
        B_t = self.B_t.new_zeros(slots + 1, rank, self.d)
        n, r = min(slots, self.A_t.shape[0] - 1), self.A_t.shape[2]
        A_t[:n, :, :r], B_t[:n, :r] = self.A_t[:n], self.B_t[:n]
        S_t = self.S_t.new_ones(slots + 1, self.d)
        S_t[:n] = self.S_t[:n]
        self.A_t, self.B_t, self.S_t = A_t, B_t, S_t

    def write(self, slot: int, A: Tensor, B: Tensor, scaling: float, scale: Tensor | None) -> None:
        r = A.shape[0]
        self.clear(slot)
        self.A_t[slot, :, :r] = A.T
        self.B_t[slot, :r] = (B * scaling).T
        self.present.add(slot)
        if scale is not None:
            self.S_t[slot] = scale
            self.scaled.add(slot)

    def clear(self, slot: int) -> None:
        self.A_t[slot].zero_()
        self.B_t[slot].zero_()
        self.S_t[slot].fill_(1.0)
        self.present.discard(slot)
        self.scaled.discard(slot)


class PoolWeights:
    """:class:`~lorakit.ops.per_row.RowPlan`'s weights read from one layer's :class:`_LayerStack` by slot.

    The rows' matrices are gathered on the first call and kept for the later calls of the same context
    (a prefill and its decode steps run the same rows); ``b * r * (k + d)`` values per layer.
    """

    def __init__(self, stack: _LayerStack, index: Tensor, shared_slot: int | None, scaled: bool):
        self.stack, self.index, self.shared_slot, self.scaled = stack, index, shared_slot, scaled
        self.cached: tuple[Tensor, Tensor, Tensor | None] | None = None

    def get(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Shared slot: its ``(k, r)``, ``(r, d)`` and factors ``(d,)``. Else ``A: (b, k, r)`` (embeddings: the
        whole stack, rows read it by token id), ``B: (b, r, d)``, factors ``(b, d)``. Factors are None when
        no row's adapter has any (no DoRA row in the batch)."""
        A_t, B_t, S_t = self.stack.A_t, self.stack.B_t, self.stack.S_t
        if self.shared_slot is not None:  # every row runs one adapter: its matrices, no gather
            return A_t[self.shared_slot], B_t[self.shared_slot], S_t[self.shared_slot] if self.scaled else None
        if self.cached is None or self.cached[1].shape[0] != self.index.shape[0]:
            self.cached = (A_t if self.stack.embedding else A_t[self.index], B_t[self.index],
                           S_t[self.index] if self.scaled else None)
        return self.cached


class AdapterPool:
    """Loaded adapters of ``model`` stacked per layer in resident slots; see the module docstring."""

    def __init__(self, model: nn.Module, slots: int = 8):
        if slots < 1:
            raise ValueError(f"AdapterPool: slots must be >= 1, got {slots}")
        self.model = model
        self.slots = slots
        self.rank = 1
        self.slot_of: dict[str, int] = {}
        self.stacks: dict[LoraLayer, _LayerStack] = {}
        self._wrapped = None  # (LoRA layers, modules_to_save wrappers) of the model, found at add/remove
        self._routed = None  # the blocks around layers that route rows (MoE experts), found with them

    def __contains__(self, name: str) -> bool:
        return name in self.slot_of

    def names(self) -> list[str]:
        return list(self.slot_of)

    def _wrappers(self):
        """The model's wrappers; walking every module is slow with many adapters, so it is done once per
        add/remove, not per composition."""
        if self._wrapped is None:
            self._wrapped = wrappers(self.model)
        return self._wrapped

    def _blocks(self) -> list[nn.Module]:
        """The blocks around layers that route rows themselves (found once per add/remove, like the wrappers)."""
        if self._routed is None:
            self._routed = routed_blocks(self.model)
        return self._routed

    def _pooled_layers(self) -> list[LoraLayer]:
        """Layers whose adapters are stacked: not convolutions (run by loop) nor layers that route rows
        themselves (MoE experts, which read their adapters' own factors)."""
        return [layer for layer in self._wrappers()[0]
                if layer.stacks_rows and not layer.routes_rows]

    def add(self, name: str) -> int:
        """Stack adapter ``name`` (already in the model) into a slot; returns the slot."""
        self._wrapped = self._routed = None  # adding the adapter may have wrapped new layers
        if name not in adapter_names(self.model):
            raise KeyError(f"AdapterPool: no adapter named {name!r}; the model has {adapter_names(self.model)}")
        every = [layer for layer in self._wrappers()[0] if name in layer.adapters]
        layers = [layer for layer in self._pooled_layers() if name in layer.adapters]
        for layer in every:  # stacked (B·A, a per-output factor), run on its rows (row_wise) or routed (experts)
            adapter = layer.adapters[name]
            if not (row_batched(adapter) and not changed_base(adapter) or row_wise(adapter)):
                why = "replaced its base weights (its init)" if row_batched(adapter) else f"is a {type(adapter).__name__}"
                raise ValueError(f"AdapterPool: adapter {name!r} {why}, which mixed-adapter batching cannot run "
                                 "beside other adapters; serve it alone or convert it to plain LoRA")
        # row_wise adapters (trainable tokens) are not stacked: rows() runs them on their rows by loop
        pairs = {layer: layer.adapters[name].plain_pair() for layer in layers if row_batched(layer.adapters[name])}
        rank = max([self.rank] + [A.shape[0] for A, _ in pairs.values()])
        slot = self.slot_of.get(name)
        if slot is None:
            used = set(self.slot_of.values())
            slot = next(i for i in range(len(used) + 1) if i not in used)
        slots = self.slots if slot < self.slots else 2 * self.slots
        if (slots, rank) != (self.slots, self.rank):
            for stack in self.stacks.values():
                stack.resize(slots, rank)
            self.slots, self.rank = slots, rank
        with torch.no_grad():
            for layer in self.stacks:  # a rewritten adapter may no longer touch some layer
                if layer not in pairs:
                    self.stacks[layer].clear(slot)
            for layer, (A, B) in pairs.items():
                if layer not in self.stacks:
                    self.stacks[layer] = _LayerStack(layer, self.slots, self.rank)
                adapter = layer.adapters[name]  # DoRA's factor: fixed while base and adapter are (a snapshot)
                self.stacks[layer].write(slot, A.detach(), B.detach(), adapter.scaling, adapter.row_scale(layer))
        self.slot_of[name] = slot
        return slot

    def remove(self, name: str) -> None:
        """Free ``name``'s slot (the adapter stays in the model; delete it there separately)."""
        slot = self.slot_of.pop(name)
        self._wrapped = self._routed = None
        for stack in self.stacks.values():
            stack.clear(slot)

    def index(self, names: list[str | None]) -> Tensor:
        """The slot of each row (``None``: the zero slot)."""
        unknown = sorted({n for n in names if n is not None and n not in self.slot_of})
        if unknown:
            raise KeyError(f"AdapterPool: {unknown} not in the pool; pooled: {sorted(self.slot_of)}")
        device = next(iter(self.stacks.values())).A_t.device if self.stacks else None
        return torch.tensor([self.slots if n is None else self.slot_of[n] for n in names], device=device)

    @contextmanager
    def rows(self, names: list[str | None]):
        """Like :func:`~lorakit.ops.per_row.per_row_adapters` (row ``i`` runs ``names[i]``), reading the
        resident stacks: entering costs one index tensor. Inference only (no gradients reach the adapters)."""
        names = list(names)
        index = self.index(names)
        slots = set(index.tolist())
        used = set(names) - {None}
        layers, saved = self._wrappers()
        if any(layer.merged for layer in layers):
            raise RuntimeError("AdapterPool.rows needs unmerged adapters; unmerge(model) first")
        for layer in layers:
            if layer.routes_rows:  # MoE experts: the rows' adapters, read live
                layer.row_plan = RoutedRows(names)
                continue
            stack = self.stacks.get(layer)
            if stack is None:  # convolutions and row_wise adapters run on their rows; untouched layers: nothing
                held = not used.isdisjoint(layer.adapters)
                layer.row_plan = LoopUpdate(layer, names) if held else ZeroUpdate(names)
                continue
            on_layer = slots & stack.present
            shared = next(iter(slots)) if len(slots) == 1 and on_layer else None
            weights = PoolWeights(stack, index, shared, bool(slots & stack.scaled))
            layer.row_plan = RowPlan(weights, index, shared is not None, stack.embedding) if on_layer \
                else ZeroUpdate(names)
        for m in saved:
            m.row_names = names
        try:
            with block_rows_checked(self._blocks(), len(names)):
                yield self.model
        finally:
            for layer in layers:
                layer.row_plan = None
            for m in saved:
                m.row_names = None

