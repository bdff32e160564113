"""Hot-swapping: replace an adapter's weights in place, so a ``torch.compile`` d model never recompiles.

``torch.compile`` guards on what a forward reads as Python values: a rank is a tensor shape and ``alpha / r``
a Python float, so loading an adapter of another rank or alpha would recompile every layer. A model prepared by
:func:`prepare_for_hotswap` holds, on each layer of the adapter, A and B zero-padded to ``max_rank`` and the
scaling as a 0-d tensor (a buffer)::

    A: (max_rank, k)  rows r..max_rank zero      B: (d, max_rank)  columns r..max_rank zero
    update = B @ A * scale   ==   B[:, :r] @ A[:r] * (alpha / r)       (the zero blocks add exact zeros)

:func:`hotswap_adapter` then checks a new adapter completely (same adapted layers, ranks up to ``max_rank``,
shapes, finite values in the model's dtype) and only then copies its weights and scaling into those tensors:
same shapes, same objects, no Python value the compiled graph depends on changes. Unprepared, it swaps
adapters of the same ranks (a changed scaling is then a new Python float: a compiled model recompiles).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .core.checkpoint import PREFIX, CheckpointError, read_adapter
from .core.config import LoraConfig
from .core.layers import Adapter, LoraLayer
from .core.model import adapter_names
from .core.targets import find_targets


class HotswapAdapter(Adapter):
    """A plain LoRA adapter padded to a fixed rank, its scaling a buffer: ``B(A(dropout(x))) * scale``.

    ``live_rank`` is the rank the current weights use (A's rows past it are zero); ``scaling`` reads and writes
    the buffer as a float, so merging, export and the per-row path see an ordinary adapter.
    """

    def __init__(self, lora_A: nn.Module, lora_B: nn.Module, dropout: nn.Module, scaling: float,
                 config: LoraConfig, live_rank: int):
        super().__init__(lora_A, lora_B, 0.0, scaling, config)
        self.dropout = dropout
        self.live_rank = live_rank

    @property
    def scaling(self) -> float:
        return float(self.scale)

    @scaling.setter
    def scaling(self, value: float) -> None:
        if "scale" in self._buffers:
            self.scale.fill_(value)
        else:  # first set by Adapter.__init__: fp32, on A's device
            self.register_buffer("scale", torch.tensor(float(value), device=self.lora_A.weight.device),
                                 persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale.to(x.dtype if x.is_floating_point()
                                                                          else self.dtype)

    def layer_output(self, layer: LoraLayer, out: Tensor, x: Tensor, inplace: bool) -> Tensor:
        x = x if x.dtype == self.dtype or not x.is_floating_point() else x.to(self.dtype)
        return out + self(x).to(out.dtype)

    def plain_pair(self) -> tuple[Tensor, Tensor]:
        A, B = super().plain_pair()
        return A[: self.live_rank], B[:, : self.live_rank]

    def export_tensors(self) -> dict[str, Tensor]:
        """The live pair under PEFT's key suffixes (the padding is not saved): rank ``live_rank``."""
        A, B = self.plain_pair()  # (an embedding layer writes PEFT's lora_embedding_A/B from plain_pair itself)
        return {"lora_A.weight": A.reshape(-1, *self.lora_A.weight.shape[1:]),
                "lora_B.weight": B.reshape(B.shape[0], -1, *self.lora_B.weight.shape[2:])}

    def load_live(self, A: Tensor, B: Tensor, scaling: float) -> None:
        """Write the plain pair ``A`` (r, k), ``B`` (d, r) with ``r <= max rank``, zero beyond, and the scaling."""
        r, full = A.shape[0], self.rank
        with torch.no_grad():
            self.load_pair(torch.cat([A, A.new_zeros(full - r, A.shape[1])]),
                           torch.cat([B, B.new_zeros(B.shape[0], full - r)], dim=1))
        self.live_rank = r
        self.scaling = scaling


def _layers(model: nn.Module, adapter: str) -> dict[str, LoraLayer]:
    if adapter not in adapter_names(model):
        raise KeyError(f"no adapter named {adapter!r}; the model has {adapter_names(model)}")
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.adapters}


def _uncompiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the model


def prepare_for_hotswap(model: nn.Module, max_rank: int, adapter: str = "default") -> nn.Module:
    """Pad adapter ``adapter`` to rank ``max_rank`` on every layer and make its scaling a tensor (before
    ``torch.compile``): afterwards :func:`hotswap_adapter` takes adapters of any rank up to ``max_rank`` and any
    alpha without recompiling. Outputs are unchanged (the padding is zeros). Returns ``model``."""
    if hasattr(model, "_orig_mod"):
        raise ValueError("prepare_for_hotswap must run before torch.compile (the compiled graph has the old shapes)")
    if type(max_rank) is not int or max_rank <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    layers = _layers(model, adapter)
    for path, layer in layers.items():
        held = layer.adapters[adapter]
        if adapter in layer.merged:
            raise RuntimeError(f"adapter {adapter!r} is merged; unmerge(model) before prepare_for_hotswap")
        if not held.additive or not hasattr(held, "plain_pair"):
            raise ValueError(f"prepare_for_hotswap: adapter {adapter!r} is a {type(held).__name__} at {path}, not a "
                             "plain B·A update; only plain LoRA adapters hot-swap")
        A, B = held.plain_pair()
        if A.shape[0] > max_rank:
            raise ValueError(f"prepare_for_hotswap: {path} has rank {A.shape[0]} > max_rank {max_rank}")
    for path, layer in layers.items():
        held = layer.adapters[adapter]
        if isinstance(held, HotswapAdapter) and held.rank == max_rank:
            continue
        A, B = held.plain_pair()
        shell = layer.make_adapter(max_rank, 1.0, held.config.replace(slices={}), path)  # the layer's A/B types
        new = HotswapAdapter(shell.lora_A, shell.lora_B, held.dropout, held.scaling, held.config, A.shape[0])
        new.load_live(A.detach(), B.detach(), held.scaling)
        new.train(held.training)
        for p in new.parameters():
            p.requires_grad_(next(held.parameters()).requires_grad)
        layer.adapters[adapter] = new
    return model


def hotswap_adapter(model: nn.Module, path_or_state: str | os.PathLike | tuple[LoraConfig, dict[str, Tensor]],
                    adapter: str = "default") -> None:
    """Replace the weights of adapter ``adapter`` by those of another adapter, in place.

    ``path_or_state``: an adapter directory (lorakit's or PEFT's), or ``(LoraConfig, tensors)`` with tensors
    under PEFT's keys. The new adapter must adapt the same layers; each layer's rank must be at most the
    prepared rank (:func:`prepare_for_hotswap`), or equal to the current one when unprepared; any alpha and
    rsLoRA setting. Everything is checked before a weight changes. The model may be the ``torch.compile`` d one.
    """
    model = _uncompiled(model)
    where = str(path_or_state) if isinstance(path_or_state, str | os.PathLike) else "the given state"
    config, tensors = _read(path_or_state)
    layers = _layers(model, adapter)
    staged = _stage(model, layers, adapter, config, tensors, where)
    for path, (A, B, scaling) in staged.items():  # validated: from here on the weights change
        held = layers[path].adapters[adapter]
        if isinstance(held, HotswapAdapter):
            held.load_live(A, B, scaling)
        else:
            held.load_pair(A, B)
            held.scaling = scaling
        held.config = config


def _read(source) -> tuple[LoraConfig, dict[str, Tensor]]:
    if isinstance(source, str | os.PathLike):
        config, _, tensors = read_adapter(Path(source))
        return config, tensors
    pair = source if isinstance(source, tuple | list) and len(source) == 2 else (None, None)
    config, tensors = pair
    if not isinstance(config, LoraConfig) or not isinstance(tensors, dict):
        raise TypeError("hotswap_adapter takes an adapter directory or (LoraConfig, {PEFT key: tensor})")
    return config, tensors


def _stage(model, layers, adapter, config, tensors, where) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Every check, nothing written: path -> (A, B, scaling) in the adapter's dtype."""
    for field, off in (("use_dora", False), ("bias", "none"), ("modules_to_save", None),
                       ("trainable_token_indices", None)):
        if getattr(config, field) != off:
            raise ValueError(f"hotswap_adapter: {where} has {field}={getattr(config, field)!r}; only plain LoRA "
                             "weights hot-swap")
    targets = find_targets(model, config) if config.target_modules != [] else []
    if sorted(targets) != sorted(layers):
        extra, missing = sorted(set(targets) - set(layers)), sorted(set(layers) - set(targets))
        raise ValueError(f"hotswap_adapter: {where} adapts other layers than adapter {adapter!r}"
                         + (f"; not adapted now: {extra[:3]}" if extra else "")
                         + (f"; not in the new adapter: {missing[:3]}" if missing else ""))
    known = {f"{PREFIX}{p}.{s}" for p in layers for s in ("lora_A.weight", "lora_B.weight", "lora_embedding_A",
                                                          "lora_embedding_B")}
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        raise ValueError(f"hotswap_adapter: {where} has tensors lorakit cannot swap in: {unexpected[:3]}")
    busy = [p for p, m in layers.items() if adapter in m.merged or m.row_plan is not None]
    if busy:
        raise RuntimeError(f"hotswap_adapter: adapter {adapter!r} is merged or inside per_row_adapters() at "
                           f"{busy[0]}; unmerge(model) / leave the context first")
    staged = {}
    for path, layer in layers.items():
        held = layer.adapters[adapter]
        if not held.additive or held.config.modules_to_save:
            what = "has modules_to_save" if held.additive else f"is a {type(held).__name__} at {path}"
            raise ValueError(f"hotswap_adapter: adapter {adapter!r} {what}; only plain LoRA weights hot-swap")
        A, B = _pair(tensors, path, where)
        capacity = held.rank if isinstance(held, HotswapAdapter) else held.plain_pair()[0].shape[0]
        r = A.shape[0]
        if r > capacity or (r != capacity and not isinstance(held, HotswapAdapter)):
            need = f"at most the prepared rank {capacity}" if isinstance(held, HotswapAdapter) else \
                f"rank {capacity} (or prepare_for_hotswap(model, max_rank) first)"
            raise ValueError(f"hotswap_adapter: {where} has rank {r} at {path}, which needs {need}")
        live_A, live_B = held.plain_pair()
        if A.shape[1:] != live_A.shape[1:] or B.shape[0] != live_B.shape[0] or B.shape[1] != r:
            raise ValueError(f"hotswap_adapter: {where} has A {tuple(A.shape)} and B {tuple(B.shape)} at {path}; "
                             f"the layer takes ({r}, {live_A.shape[1]}) and ({live_B.shape[0]}, {r})")
        A, B = A.to(held.dtype), B.to(held.dtype)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"hotswap_adapter: {where} has non-finite values at {path} in {held.dtype}")
        scaling = config.scaling(path)
        if not math.isfinite(scaling):
            raise ValueError(f"hotswap_adapter: {where} gives scaling {scaling} at {path}")
        staged[path] = (A, B, scaling)
    return staged


def _pair(tensors: dict[str, Tensor], path: str, where: str) -> tuple[Tensor, Tensor]:
    """(A, B) of ``path`` as ``(r, k)``, ``(d, r)`` matrices (PEFT stores an embedding's A as ``(r, num)``)."""
    for a_key, b_key in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
        a, b = f"{PREFIX}{path}.{a_key}", f"{PREFIX}{path}.{b_key}"
        if a in tensors and b in tensors:
            A, B = tensors[a], tensors[b]
            if A.dim() < 2 or B.dim() < 2 or not A.is_floating_point() or not B.is_floating_point():
                raise CheckpointError(f"hotswap_adapter: {where}: {a} / {b} are not float matrices")
            return A.flatten(1), B.flatten(1)
    raise ValueError(f"hotswap_adapter: {where} has no lora_A / lora_B for {path}")
