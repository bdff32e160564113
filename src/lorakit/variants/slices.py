"""Fused slices (``LoraConfig.slices``): LoRA on chosen equal output slices of a fused projection.

GPT-2's ``c_attn`` computes q, k and v in one ``(3 * 768)``-output layer; the paper adapts q and v only.
``slices={"c_attn": [True, False, True]}`` gives each enabled slice its own rank-``r`` pair (loralib's
``MergedLinear``). Checkpoints hold the exactly equivalent plain LoRA of rank ``n_on * r`` (a block-structured
B), so PEFT and vLLM read them. Joins core through :data:`lorakit.core.tables.PAIR_TYPES` (:func:`register`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.config import LoraConfig, short_repr
from ..core.layers import Adapter, LoraLayer, LoraLinear, factory_kwargs
from ..core.tables import CONFIG_CHECKS, PAIR_TYPES


class SlicedAdapter(Adapter):
    """LoRA on chosen equal output slices of a fused projection (loralib's ``MergedLinear``).

    For GPT-2's ``c_attn`` (q, k, v fused, ``d = 3 * 768``) with ``mask = [True, False, True]``, q and v
    each get a rank-r pair and k gets nothing. ``lora_A.weight`` is ``(n_on * r, k)``; ``lora_B.weight``
    is ``(n_on * d_slice, r)``: block ``j`` of B maps rank block ``j`` of A to the j-th enabled slice.
    """

    def __init__(self, in_features: int, out_features: int, mask: list[bool], r: int, dropout: float,
                 scaling: float, config: LoraConfig, *, device=None, dtype=None):
        if out_features % len(mask):
            raise ValueError(f"slices {mask}: output size {out_features} does not split into {len(mask)} equal parts")
        n_on = sum(mask)
        self.d_slice = out_features // len(mask)
        lora_A = nn.Linear(in_features, n_on * r, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(r, n_on * self.d_slice, bias=False, device=device, dtype=dtype)
        super().__init__(lora_A, lora_B, dropout, scaling, config)
        self.mask = list(mask)
        self.register_buffer("on_slices", torch.tensor([i for i, m in enumerate(mask) if m]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n_on, r = len(self.on_slices), self.rank
        a = self.lora_A(self.dropout(x)).unflatten(-1, (n_on, r))  # (..., n_on, r)
        b = torch.einsum("...jr,jdr->...jd", a, self.lora_B.weight.view(n_on, self.d_slice, r))
        out = a.new_zeros(*x.shape[:-1], len(self.mask), self.d_slice)
        out = out.index_copy(-2, self.on_slices, b)  # enabled slices get their update, others stay zero
        return out.flatten(-2) * self.scaling

    def export_tensors(self) -> dict[str, Tensor]:  # the equivalent plain LoRA of rank n_on * r
        A, B = self.plain_pair()
        return {"lora_A.weight": A, "lora_B.weight": B, **self.extra_tensors()}

    def export_pattern(self, alpha: float) -> tuple[int, float]:  # same scaling at rank n_on * r
        n_on = len(self.on_slices)
        return n_on * self.rank, alpha * (math.sqrt(n_on) if self.config.use_rslora else n_on)

    def plain_pair(self) -> tuple[Tensor, Tensor]:
        """A: ``(n_on*r, k)``; B: ``(d, n_on*r)`` block-structured, zero outside enabled slices."""
        r, ds = self.rank, self.d_slice
        B = self.lora_B.weight
        full_B = B.new_zeros(len(self.mask) * ds, len(self.on_slices) * r)
        for j, s in enumerate(self.on_slices.tolist()):
            full_B[s * ds:(s + 1) * ds, j * r:(j + 1) * r] = B[j * ds:(j + 1) * ds]
        return self.lora_A.weight, full_B


def sliced_pair(layer: LoraLayer, r: int, scaling: float, config: LoraConfig, module_name: str) -> SlicedAdapter | None:
    """The :data:`~lorakit.core.tables.PAIR_TYPES` entry: a :class:`SlicedAdapter` for a linear layer that
    ``config.slices`` names, else None (the layer type's own pair)."""
    mask = config.slices_for(module_name)
    if mask is None or not isinstance(layer, LoraLinear):
        return None
    kw = factory_kwargs(layer.base_layer.weight)
    return SlicedAdapter(layer.in_features, layer.out_features, mask, r, config.dropout, scaling, config, **kw)


def check_config(config: LoraConfig) -> None:
    """Core's ``CONFIG_CHECKS`` entry: each mask of ``config.slices`` is a list of >= 2 booleans, one True at least."""
    for key, mask in config.slices.items():
        if not (isinstance(mask, list) and len(mask) >= 2 and all(isinstance(b, bool) for b in mask) and any(mask)):
            raise ValueError(f"slices[{short_repr(key)}] must be a list of >= 2 booleans with at least one True, got "
                             f"{short_repr(mask)}")


def register() -> None:
    """Make ``LoraConfig.slices`` build sliced pairs on linear layers; calling it again changes nothing."""
    for table, entry in ((PAIR_TYPES, sliced_pair), (CONFIG_CHECKS, check_config)):
        if entry not in table:
            table.append(entry)
