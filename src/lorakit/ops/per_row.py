"""One batch, one adapter per row: the LoRA update of row ``i`` uses adapter ``names[i]``.

Gathered path (BGMV-style, as Punica / S-LoRA): the adapters in use are stacked,
``A_s: (n+1, k, r_max)`` and ``B_s: (n+1, r_max, d)`` with the scaling folded into B, slot ``n`` all
zeros for base rows (``None``; stacked only when there are some), ranks zero-padded to ``r_max``. Each
row gathers its slot and the update is two batched matmuls (:func:`bgmv`)::

    a[i] = x[i] @ A_s[idx[i]]        # (s, r_max)
    y[i] = a[i] @ B_s[idx[i]]        # (s, d)

Cost is that of a single adapter of rank r_max, whatever the number of distinct adapters. A
:class:`RowPlan` (what ``LoraLayer.row_plan`` holds) runs :func:`bgmv` on weights from one of two
sources: :class:`StackedWeights`, stacked per context from the adapters (here), or the resident stacks
of :class:`lorakit.ops.pool.AdapterPool`. :func:`loop_update` runs each adapter on its own rows: the
reference (test oracle) and the path for convolutions and for adapters that are not a stackable update
but act on their rows alone (``row_wise``: trainable tokens, whose rows replace embedding rows and logits).

Expert rows. A layer that routes tokens itself (``routes_rows``: the experts of a MoE block) gets the rows'
names (:class:`RoutedRows`) and groups its (token, expert) pairs by adapter, then expert
(:meth:`lorakit.variants.params.ParamLayer.row_forward`).

DoRA rows. A DoRA adapter's output is ``f ⊙ (W0·x + s·B·A·x) + bias`` with ``f = m / ||W0 + s·B·A||`` per
output feature; the base is frozen, so ``f`` is fixed for the adapter and stacked beside A and B as
``S: (n+1, d)`` (1 for plain LoRA and base rows; :meth:`Adapter.row_scale`). With ``out = base(x)``::

    y[i] = out[i] + (f[i] - 1) ⊙ (out[i] - bias) + f[i] ⊙ update[i]          (:func:`scaled_output`)

which is ``out + update`` exactly where ``f = 1``, and PEFT's DoRA formula elsewhere (no dropout).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layers import Adapter, LoraLayer
from ..core.model import adapter_names, base_owner, check_base_kept, merged_names, wrappers
from ..core.targets import outside_adapters


def bgmv(x: Tensor, A: Tensor, B: Tensor, index: Tensor | None, embedding: bool) -> Tensor:
    """The batched-adapter update ``y[i] = x[i] @ A_i @ B_i`` (scaling already in B).

    ``index=None``: every row runs one adapter, ``A: (k, r)``, ``B: (r, d)``. Otherwise ``B: (b, r, d)``
    gathered per row and ``A: (b, k, r)`` gathered per row, or for embeddings (``x``: token ids) the whole
    stack ``(n, k, r)``, read at ``(index[i], x[i])``.
    """
    if index is None:
        return (A[x] if embedding else x.to(A.dtype) @ A) @ B  # (b, ..., d)
    b = x.shape[0]
    if embedding:
        a = A[index.view(b, *([1] * (x.dim() - 1))), x].reshape(b, -1, A.shape[-1])  # (b, s, r)
        lead = x.shape
    else:
        x = x.to(A.dtype)
        a = torch.bmm(x.reshape(b, -1, x.shape[-1]), A)  # (b, s, r)
        lead = x.shape[:-1]
    y = torch.bmm(a, B)  # (b, s, d)
    return y.view(*lead, y.shape[-1])


def scaled_output(layer: LoraLayer, out: Tensor, update: Tensor, scale: Tensor) -> Tensor:
    """``out + (f - 1)·(out - bias) + f·update``; ``scale``: ``(d,)`` shared or ``(b, d)`` per row (feature last)."""
    f = scale.to(out.dtype)
    if f.dim() == 2:
        f = f.view(f.shape[0], *[1] * (out.dim() - 2), f.shape[1])  # (b, 1..., d)
    bias = getattr(layer.base_layer, "bias", None)
    base = out if bias is None else out - bias.to(out.dtype)
    return torch.addcmul(torch.addcmul(out, f - 1, base), f, update)


class RowWeights(Protocol):
    """A source of :func:`bgmv`'s right-hand operands (and DoRA's factors) for one layer and one batch."""

    def get(self) -> tuple[Tensor, Tensor, Tensor | None]: ...


@dataclass(eq=False)
class RowPlan:
    """The per-row update of one layer: ``x -> bgmv(x, *weights.get(), index)``."""

    weights: RowWeights
    index: Tensor  # (b,) the slot of each row
    shared: bool  # every row runs one adapter: its matrices directly, no gather
    embedding: bool  # x holds token ids

    def __call__(self, x: Tensor) -> Tensor:
        """The rows' ``s·B·A·x`` alone."""
        check_rows_match(self.index, x)
        A, B, _ = self.weights.get()
        return bgmv(x, A, B, None if self.shared else self.index, self.embedding)

    def output(self, layer: LoraLayer, out: Tensor, x: Tensor) -> Tensor:
        """The layer's output given its base output ``out``."""
        check_rows_match(self.index, x)
        A, B, scale = self.weights.get()
        update = bgmv(x, A, B, None if self.shared else self.index, self.embedding).to(out.dtype)
        return out + update if scale is None else scaled_output(layer, out, update, scale)


class StackedWeights:
    """Per-row weights stacked from the adapters on entering a context.

    With grad enabled the stacks are rebuilt per call so that gradients reach every adapter's A and B.
    Under ``torch.no_grad`` / ``inference_mode`` the per-row weights are gathered once and reused by every
    call inside the context (decoding runs the same rows for every new token); they hold ``b`` adapter
    copies per layer (``b * r_max * (k + d)`` values), less than the KV cache of those rows.
    """

    def __init__(self, layer: LoraLayer, adapters: list[Adapter], index: Tensor, zero_slot: bool, shared: bool):
        self.layer, self.adapters, self.index, self.zero_slot = layer, adapters, index, zero_slot
        self.shared, self.embedding = shared, layer.takes_ids
        self.cached: tuple[Tensor, Tensor, Tensor | None] | None = None

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

    def scales(self) -> Tensor | None:
        """``S: (n[+1], d)`` fp32, each adapter's :meth:`~lorakit.core.layers.Adapter.row_scale` (1 where it
        has none, and in the zero slot); None when no adapter has one."""
        found = [adapter.row_scale(self.layer) for adapter in self.adapters]
        if all(f is None for f in found):
            return None
        d = next(f for f in found if f is not None).shape[0]
        ones = torch.ones(d, device=self.index.device)
        return torch.stack([ones if f is None else f for f in found] + ([ones] if self.zero_slot else []))

    def get(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``A: (b, k, r_max)`` (embeddings: the whole stack), ``B: (b, r_max, d)``, DoRA's factors
        ``(b, d)`` or None; shared: the one adapter's ``(k, r_max)``, ``(r_max, d)``, ``(d,)`` or None."""
        if self.cached is not None and not torch.is_grad_enabled():  # with grad: fresh, so gradients flow
            return self.cached
        (A_s, B_s), S = self.stacks(), self.scales()
        if self.shared:
            A_g, B_g, S_g = A_s[0].T, B_s[0].T, None if S is None else S[0]
        else:
            A_g = A_s.transpose(1, 2) if self.embedding else A_s[self.index].transpose(1, 2)
            B_g, S_g = B_s[self.index].transpose(1, 2), None if S is None else S[self.index]
        if not torch.is_grad_enabled():
            self.cached = (A_g, B_g, S_g)
        return A_g, B_g, S_g


def _row_groups(layer: LoraLayer, x: Tensor, names: list[str | None]):
    """``(rows, adapter, x[rows])`` for each adapter of this layer that some row runs (base rows skipped)."""
    check_rows_match(names, x)
    for name in dict.fromkeys(names):
        if name is None or name not in layer.adapters:
            continue
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        adapter = layer.adapters[name]
        yield rows, adapter, (x[rows] if not x.is_floating_point() else x[rows].to(adapter.dtype))


def loop_update(layer: LoraLayer, x: Tensor, names: list[str | None]) -> Tensor:
    """Reference: the LoRA update of each row computed by running its adapter on its rows alone."""
    out = None
    for rows, adapter, xs in _row_groups(layer, x, names):
        part = adapter(xs)
        if out is None:
            out = part.new_zeros(x.shape[0], *part.shape[1:])
        out = out.index_copy(0, rows, part)
    if out is None:  # every row is a base row
        return torch.zeros((), device=x.device)
    return out


def loop_output(layer: LoraLayer, out: Tensor, x: Tensor, names: list[str | None]) -> Tensor:
    """Reference for any adapter kind: each adapter's own ``layer_output`` on its rows; base rows keep ``out``."""
    for rows, adapter, xs in _row_groups(layer, x, names):
        if len(rows) == len(names):  # every row runs this adapter (rows in order): no gather, no copy back
            return adapter.layer_output(layer, out, xs, False).to(out.dtype)
        out = out.index_copy(0, rows, adapter.layer_output(layer, out[rows], xs, False).to(out.dtype))
    return out


@dataclass(eq=False)
class LoopUpdate:
    """Per-row output by :func:`loop_output` (convolutions, and the layers no row's adapter touches)."""

    layer: LoraLayer
    names: list[str | None]

    def __call__(self, x: Tensor) -> Tensor:
        return loop_update(self.layer, x, self.names)

    def output(self, layer: LoraLayer, out: Tensor, x: Tensor) -> Tensor:
        return loop_output(layer, out, x, self.names)


@dataclass(eq=False)
class ZeroUpdate:
    """No row's adapter touches the layer: the update is zero."""

    names: list[str | None]

    def __call__(self, x: Tensor) -> Tensor:
        check_rows_match(self.names, x)
        return torch.zeros((), device=x.device)

    def output(self, layer: LoraLayer, out: Tensor, x: Tensor) -> Tensor:
        check_rows_match(self.names, x)
        return out


@dataclass(eq=False)
class RoutedRows:
    """The plan of a layer that groups its tokens by row itself (``routes_rows``: the experts of a MoE block,
    :meth:`lorakit.variants.params.ParamLayer.row_forward`): it reads the rows' adapter names."""

    names: list[str | None]


def routed_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules around the layers that route rows themselves (a MoE block around its experts)."""
    return [model.get_submodule(path.rpartition(".")[0]) for path, m in outside_adapters(model)
            if path and isinstance(m, LoraLayer) and m.routes_rows]


@contextmanager
def block_rows_checked(blocks: list[nn.Module], rows: int):
    """A routed layer sees the batch flattened to tokens and cannot count its rows; the block around it still
    gets ``(b, s, H)``: while inside, a block called with ``b != rows`` refuses, naming both counts."""
    def check(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, Tensor) and x.dim() == 3 and x.shape[0] != rows:
            raise ValueError(f"per_row_adapters got {rows} adapter names for a batch of {x.shape[0]} rows")

    handles = [block.register_forward_pre_hook(check, with_kwargs=True) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_rows_match(names, x: Tensor) -> None:
    if len(names) != x.shape[0]:
        raise ValueError(f"per_row_adapters got {len(names)} adapter names for a batch of {x.shape[0]} rows")


def make_row_update(layer: LoraLayer, names: list[str | None]) -> RowPlan | LoopUpdate | RoutedRows:
    """The per-row update for ``layer``: gathered for linear-like and embedding layers whose adapters stack
    (``row_batched``), loop for convolutions and for adapters that run on their rows alone (``row_wise``), the
    names for a layer that routes rows itself (``routes_rows``: MoE experts)."""
    if layer.routes_rows:
        return RoutedRows(names)
    used = [n for n in dict.fromkeys(names) if n is not None and n in layer.adapters]
    if not layer.stacks_rows or not used or not all(row_batched(layer.adapters[n]) for n in used):
        return LoopUpdate(layer, names)
    slot = {n: j for j, n in enumerate(used)}  # base rows get the zero slot len(used)
    slots = [slot.get(n, len(used)) for n in names]
    index = torch.tensor(slots, device=layer.weight.device)
    zero_slot = len(used) in slots  # only stacked when some row is a base row
    shared = len(used) == 1 and not zero_slot  # every row runs one adapter: no gather
    weights = StackedWeights(layer, [layer.adapters[n] for n in used], index, zero_slot, shared)
    return RowPlan(weights, index, shared, weights.embedding)


def row_batched(adapter: nn.Module) -> bool:
    """Whether the per-row path can stack ``adapter`` (``Adapter.row_batched``: its ``B·A``, and a per-output
    factor of it)."""
    return bool(getattr(adapter, "row_batched", False))


def row_wise(adapter: nn.Module) -> bool:
    """Whether the per-row path may run ``adapter``'s own ``layer_output`` on its rows alone (``row_wise``: row
    ``i``'s output depends on row ``i`` only; trainable tokens). An adapter module that says neither this nor
    ``row_batched`` (parameter adapters) is refused by name."""
    return bool(getattr(adapter, "row_wise", False))


def check_rows(model: nn.Module, layers: list[LoraLayer], names: list[str | None]) -> None:
    """Refuse base rows or other adapters beside a base-replacing adapter, and adapters the per-row path
    cannot compute (neither ``row_batched`` nor ``row_wise``)."""
    owner = base_owner(layers)
    if owner is not None and any(n != owner for n in names):
        check_base_kept(model, "per_row_adapters with rows of other adapters or of the base model")
    used = set(names)
    for layer in layers:
        for name in used & set(layer.adapters):
            adapter = layer.adapters[name]
            if not row_batched(adapter) and not row_wise(adapter):
                raise ValueError(f"per_row_adapters: adapter {name!r} is a {type(adapter).__name__}"
                                 ", which per-row batching does not support; run it with use_adapter()")


@contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None]):
    """Row ``i`` of the batch runs adapter ``names[i]`` (``None``: the base model), in one forward.

    Linear-like and embedding layers use stacked adapter weights gathered per row (one batched matmul
    pair per layer whatever the number of adapters); DoRA rows add one per-output factor each (see the
    module docstring); trainable-token rows (``row_wise``) run each adapter on its own rows; dropout is not
    applied. Inside
    :func:`~lorakit.core.model.disabled` every row runs the base model. ``modules_to_save`` copies run on
    their rows along the batch's first dimension, so they must return one tensor with the batch first:
    recurrent modules are refused.
    """
    names = list(names)
    known = set(adapter_names(model))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise KeyError(f"per_row_adapters: no adapter named {unknown}; the model has {sorted(known)}")
    layers, saved = wrappers(model)
    if merged_names(model):
        raise RuntimeError("per_row_adapters needs unmerged adapters; unmerge(model) first")
    for m in saved:
        if isinstance(m.original, nn.RNNBase) and any(n in m.copies for n in names):
            raise ValueError(f"per_row_adapters cannot split the rows of modules_to_save module "
                             f"{type(m.original).__name__} (a recurrent module returns a tuple, batch not first)")
    check_rows(model, layers, names)
    plans = [make_row_update(layer, names) for layer in layers]
    before = [(layer, layer.row_plan) for layer in layers], [(m, m.row_names) for m in saved]
    for layer, plan in zip(layers, plans, strict=True):
        layer.row_plan = plan
    for m in saved:
        m.row_names = names
    try:
        with block_rows_checked(routed_blocks(model) if any(isinstance(p, RoutedRows) for p in plans) else [],
                                len(names)):
            yield model
    finally:  # nested contexts restore the outer rows
        for layer, plan in before[0]:
            layer.row_plan = plan
        for m, row_names in before[1]:
            m.row_names = row_names
