"""DoRA (Liu et al., 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation, as an adapter variant."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.checkpoint import CONFIG_NAME, PREFIX, CheckpointError
from ..core.config import LoraConfig
from ..core.layers import Adapter, LoraLayer, LoraLinear
from ..core.tables import TENSOR_CHECKS, VARIANTS
from ..layers import LoraConv, LoraEmbedding
from .derived import Derived
from .slices import SlicedAdapter


class DoraAdapter(Adapter):
    """DoRA (Liu et al., 2024, arXiv 2402.09353): a learned magnitude per output feature times a direction.

    With ``V = W0 + s·B·A`` as ``(d, k)`` and ``n = ||V||`` per output row (detached, as PEFT does: its
    gradient is not propagated, section 4.3 of the paper), the layer computes ``(m / n) * (W0·x + s·B·A·x) + bias``,
    computed from the base output ``out`` as ``(m/n) * (out - bias + s·B·A·x) + bias``. ``m`` (``(d,)``,
    PEFT's ``lora_magnitude_vector``) starts at ``n``, so a fresh adapter leaves the output unchanged.

    The row norms come without materialising ``V`` (no ``(d, k)`` temporary per step):
    ``n_i^2 = ||W0_i||^2 + 2s·B_i·(A·W0_i^T) + s^2·B_i·(A·A^T)·B_i^T``.
    With dropout in training, the base term uses the dropped input (as PEFT's): ``W0·drop(x)`` is recomputed.
    """

    additive = False

    @classmethod
    def wanted(cls, config: LoraConfig) -> bool:
        return bool(getattr(config, "use_dora", False))

    @classmethod
    def check_layer(cls, layer: LoraLayer, plain: Adapter) -> None:
        if type(plain) is not Adapter or not isinstance(layer, LoraLinear | LoraEmbedding | LoraConv):
            what = "fused slices" if isinstance(plain, SlicedAdapter) else type(layer.base_layer).__name__
            raise ValueError(f"DoRA is not supported on {what}")

    @classmethod
    def wrap(cls, layer: LoraLayer, plain: Adapter) -> DoraAdapter:
        cls.check_layer(layer, plain)
        dora = cls(plain.lora_A, plain.lora_B, 0.0, plain.scaling, plain.config)
        dora.dropout = plain.dropout
        dora._norms = Derived()  # the row norms, kept for inference while W0, A and B are unchanged
        if "base_change" in plain.__dict__:
            dora.base_change = plain.base_change
        w = plain.lora_B.weight
        magnitude = torch.empty(layer.weight_matrix().shape[0], device=w.device, dtype=w.dtype)
        if not magnitude.is_meta:
            with torch.no_grad():
                base = getattr(dora, "base_change", None)
                W = layer.as_matrix(base.new_base) if base is not None else layer.weight_matrix()
                magnitude.copy_(dora.row_norm(W))
        dora.lora_magnitude_vector = nn.Parameter(magnitude)
        # PEFT stores a convolution's magnitude (weight (d, k, *kernel)) as (1, d, 1, ...), the others' as (d,)
        dims = layer.base_layer.weight.dim()
        dora.file_shape = (1, -1, *[1] * (dims - 2)) if dims > 2 else (-1,)
        return dora

    @property
    def row_batched(self) -> bool:
        return True  # the base is frozen: m / ||W0 + s·B·A|| is one factor per output, see row_scale

    def row_scale(self, layer: LoraLayer) -> Tensor:
        """``m / ||W0 + s·B·A||`` per output ``(d,)``, fp32 (the norm detached, as in :meth:`layer_output`)."""
        return _factor(self.lora_magnitude_vector.float(), self.layer_norm(layer))

    def layer_norm(self, layer: LoraLayer) -> Tensor:
        """:meth:`row_norm` of the layer's base weight, fp32 ``(d,)``. Inference forwards (grad disabled:
        ``use_adapter``, ``generate``, serving) keep it until the base weight, A or B changes
        (:class:`~lorakit.variants.derived.Derived`); a forward with grad computes it every time."""
        return self._norms.get((layer.weight, self.lora_A.weight, self.lora_B.weight),
                               lambda: self.row_norm(layer.weight_matrix()))

    def row_norm(self, W: Tensor) -> Tensor:
        """``||W + s·B·A||`` per output row, in fp32, detached: ``(d,)``."""
        with torch.no_grad():
            A, B = (t.float() for t in self.plain_pair())
            W, s = W.float(), self.scaling
            AW = A @ W.T  # (r, d)
            sq = W.pow(2).sum(1) + 2 * s * (B * AW.T).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
            return sq.clamp_min(0).sqrt()

    def layer_output(self, layer: LoraLayer, out: Tensor, x: Tensor, inplace: bool) -> Tensor:
        x = x if x.dtype == self.dtype or not x.is_floating_point() else x.to(self.dtype)
        norm = self.layer_norm(layer).to(self.dtype)
        scale = layer.feature_view(_factor(self.lora_magnitude_vector, norm))  # (d,), broadcast over the output
        bias = getattr(layer.base_layer, "bias", None)
        bias = None if bias is None else layer.feature_view(bias)
        if self.training and not isinstance(self.dropout, nn.Identity):  # as PEFT: base term on the dropped x
            xd = self.dropout(x)
            base = layer.base_layer(xd)
            base = base if bias is None else base - bias
            lora = self.lora_B(self.lora_A(xd))
            return out + ((scale - 1) * base + scale * lora * self.scaling).to(out.dtype)
        lora = self.lora_B(self.lora_A(x)).to(out.dtype)
        # (m/n)·(W0·x + s·B·A·x) + bias: autograd keeps one (n, d) tensor (the direction) for the backward,
        # where PEFT's out + (m/n - 1)·W0·x + (m/n)·s·B·A·x keeps two (W0·x and B·A·x)
        direction = torch.add(out if bias is None else out - bias, lora, alpha=self.scaling)
        scale = scale.to(out.dtype)
        return scale * direction if bias is None else torch.addcmul(bias.to(out.dtype), scale, direction)

    def merged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        V = layer.as_matrix(weight) + self.delta_matrix()  # (d, k) fp32
        self._merge_factor = _factor(self.lora_magnitude_vector.detach().float(), V.norm(dim=1))  # for the inverse
        return layer.to_base_layout(self._merge_factor[:, None] * V)

    def unmerged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        factor = self.__dict__.pop("_merge_factor", None)
        if factor is None:
            raise RuntimeError("DoRA unmerge without a matching merge")
        return layer.to_base_layout(layer.as_matrix(weight) / factor[:, None] - self.delta_matrix())

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"lora_magnitude_vector": self.lora_magnitude_vector.view(self.file_shape)}


def _factor(magnitude: Tensor, norm: Tensor) -> Tensor:
    """``m / n`` per output row; 1 where ``n == 0`` (a zero row has no direction: the row runs as plain LoRA
    instead of giving 0/0, which PEFT does)."""
    zero = norm == 0
    return torch.where(zero, torch.ones_like(magnitude), magnitude / torch.where(zero, torch.ones_like(norm), norm))


MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-output-feature magnitude, under PEFT's key


def check_magnitudes(config: LoraConfig, tensors: dict[str, Tensor], weights_file: Path) -> set[str]:
    """Core's ``TENSOR_CHECKS`` entry: a DoRA checkpoint (``use_dora: true``) holds the magnitude of each
    ``lora_A``/``lora_B`` pair, a plain one none; a :class:`CheckpointError` naming the key otherwise. Vouches
    for no rank."""
    for key in sorted(tensors):
        if key.endswith(MAGNITUDE) and not config.use_dora:
            raise CheckpointError(f"{weights_file}: {key} is a DoRA magnitude, but {CONFIG_NAME} has use_dora false")
        if config.use_dora and key.endswith(("lora_A.weight", "lora_embedding_A")):
            stem = key.rsplit(".lora_", 1)[0]
            if f"{stem}.{MAGNITUDE}" not in tensors:
                raise CheckpointError(f"{weights_file}: {CONFIG_NAME} has use_dora true, but {stem}.{MAGNITUDE} (the "
                                      f"DoRA magnitude of {stem.removeprefix(PREFIX)}) is missing")
    return set()


def register() -> None:
    r"""Join core's variant table: a config with ``use_dora=True`` builds :class:`DoraAdapter`\ s."""
    if DoraAdapter not in VARIANTS:
        VARIANTS.append(DoraAdapter)
    if check_magnitudes not in TENSOR_CHECKS:
        TENSOR_CHECKS.append(check_magnitudes)
