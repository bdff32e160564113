"""LoRA variants and initialisers: small strategies beside :class:`~lorakit.core.layers.Adapter`.

The seam (the contract other variants build on)
-----------------------------------------------

**Adapter variants** change what an adapter computes. A variant is a subclass of ``Adapter`` (as
:class:`~lorakit.core.layers.SlicedAdapter` is) registered in :data:`VARIANTS`; ``LoraLayer`` never
asks which one it holds. A variant class provides:

- ``wanted(config) -> bool`` (classmethod): whether a ``LoraConfig`` (or a subclass of it) asks for it.
  The first class in :data:`VARIANTS` that wants the config wraps the plain adapter.
- ``wrap(layer, plain) -> Adapter`` (classmethod): build the variant from the plain adapter the layer
  type made (its ``lora_A``, ``lora_B``, dropout, scaling, config are reused as they are) after the
  initialiser ran. Raise ``ValueError`` naming the layer type for what it cannot do (``check_layer``).
- ``layer_output(layer, out, x, inplace)``: the layer's output; ``out = layer.base_layer(x)`` (bias included).
- ``merged_weight(layer, w)`` / ``unmerged_weight(layer, w)``: fold in / take out, on the fp32 base
  weight in the base layout; ``unmerged_weight(merged_weight(w)) == w`` to fp32 rounding.
- ``extra_tensors()``: checkpoint tensors besides A and B, by key suffix after the module path.
- ``additive = False`` unless the output is exactly ``base + B·A·x·scaling`` with ``plain_pair()``:
  per-row batching, ``combine_adapters`` and plain-LoRA conversion refuse non-additive adapters.

What a variant may read from the layer (never ``if isinstance`` on layer types): ``layer.base_layer``,
``layer.base_weight()`` / ``layer.write_base(w)`` (the base weight in its layout, detached; a quantized
layer dequantizes / requantizes there), ``layer.weight_matrix()`` (the base weight as ``(d, k)``: d
outputs, k inputs), ``layer.as_matrix(w)`` / ``layer.to_base_layout(m)`` (between the base layout and
``(d, k)``), ``layer.feature_view(v)`` (a ``(d,)`` vector shaped to broadcast against the output).

**Initialisers** set an adapter's A and B when it is built: :data:`INITIALIZERS` maps a name (PEFT's
``init_lora_weights`` value; ``"pissa_niter_16"`` is the entry ``"pissa_niter"`` with argument 16) to
``fn(layer, adapter, arg) -> BaseChange | None``. An initialiser never writes the model: one that
changes the base weight (PiSSA, OLoRA, LoftQ) returns a :class:`BaseChange` holding the new base (in the
base layout, any float dtype: ``layer.write_base`` casts, a quantized layer requantizes) and the pair
``(A0, B0)`` it took out, so that::

    original base  ==  new base + scaling · B0 · A0          (exact up to rounding for PiSSA/OLoRA)

Restore and conversion rely on this identity; an initialiser for which it holds only approximately
(LoftQ: the quantization error remains) returns ``A0 = B0 = None``: its base change is for good (nothing
to restore, no conversion, no exclusivity) and its docstring says so.

The layer writes the new base when the adapter is attached (``LoraLayer.attach``, at commit time),
keeps ``A0, B0`` on the adapter (non-persistent buffers), and restores the original base when the
adapter is deleted or unloaded without merging. From that record :func:`plain_lora_pair` gives the
exactly equivalent plain LoRA for the **original** base, ``A' = [A; A0]``, ``B' = [B, -B0]`` (rank 2r,
same scaling), whatever initialiser changed the base (PEFT's ``path_initial_model_for_weight_conversion``).
A base-changing adapter must be the only adapter on its model (:func:`check_base_kept`): the base model
(``disabled``, per-row base rows) and other adapters would run on the residual as if it were the base.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .layers import Adapter, LoraConv, LoraEmbedding, LoraLayer, LoraLinear, SlicedAdapter
from .targets import outside_adapters


# ----- initialisers -----------------------------------------------------------------------------------------
@dataclass
class BaseChange:
    """What a base-changing initialiser did: ``original == new_base + scaling * B0 @ A0`` (in ``(d, k)``)."""

    new_base: Tensor  # base layout, any float dtype (LoraLayer.write_base casts or quantizes)
    A0: Tensor | None  # (r, k); None: the change is for good (LoftQ: the base becomes its quantized version)
    B0: Tensor | None  # (d, r)


def _random_init(layer: LoraLayer, adapter: Adapter, arg: str) -> None:
    layer.init_adapter(adapter, arg)  # the layer type's own: A random, B zero


def _pissa_init(layer: LoraLayer, adapter: Adapter, niter: int | None) -> BaseChange:
    """PiSSA (arXiv 2404.02948): A, B from the top-r singular triplets of W0, W0 replaced by the residual.

    ``W0 = U S V^T``; ``B = U_r sqrt(S_r) / sqrt(s)``, ``A = sqrt(S_r) V_r^T / sqrt(s)``, so ``s·B·A`` is the
    best rank-r part of W0, and the base becomes ``W0 - s·B·A``. ``niter``: randomized SVD
    (``torch.svd_lowrank`` with that many subspace iterations) instead of the full SVD.
    """
    W, r, s = _base_for_init(layer, adapter)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = S.sqrt() / math.sqrt(s)
    return _take_out(layer, adapter, W, A=root[:, None] * Vh, B=U * root[None, :])


def _olora_init(layer: LoraLayer, adapter: Adapter, arg: None) -> BaseChange:
    """OLoRA (arXiv 2406.01775), as PEFT: ``W0 = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``, base ``W0 - s·B·A``."""
    W, r, s = _base_for_init(layer, adapter)
    Q, R = torch.linalg.qr(W)
    return _take_out(layer, adapter, W, A=R[:r], B=Q[:, :r])


def _base_for_init(layer: LoraLayer, adapter: Adapter) -> tuple[Tensor, int, float]:
    if isinstance(adapter, SlicedAdapter) or not isinstance(layer, LoraLinear):
        where = "fused slices" if isinstance(adapter, SlicedAdapter) else type(layer.base_layer).__name__
        raise ValueError(f"init {adapter.config.init!r} works on linear layers (as PEFT's), not on {where}")
    W = layer.weight_matrix().float()  # (d, k)
    r = adapter.rank
    if r > min(W.shape):
        raise ValueError(f"init {adapter.config.init!r}: rank {r} exceeds min{tuple(W.shape)} of the base weight")
    return W, r, adapter.scaling


def _take_out(layer: LoraLayer, adapter: Adapter, W: Tensor, A: Tensor, B: Tensor) -> BaseChange:
    adapter.load_pair(A, B)
    A0, B0 = adapter.plain_pair()  # in the adapter's dtype: the residual is taken out of exactly what runs
    residual = W - adapter.scaling * (B0.float() @ A0.float())
    return BaseChange(layer.to_base_layout(residual), A0.detach().clone(), B0.detach().clone())


def _loftq_init(layer: LoraLayer, adapter: Adapter, iters: int | None) -> BaseChange:
    from .quantized import loftq_init  # bitsandbytes' quantizer, imported lazily

    return loftq_init(layer, adapter, iters or 1)


#: name -> (function, how its argument is read from the name); a name with an argument is ``<name>_<int>``.
INITIALIZERS: dict[str, Callable[[LoraLayer, Adapter, object], BaseChange | None]] = {
    "kaiming": _random_init,
    "gaussian": _random_init,
    "pissa": _pissa_init,  # arg None: full SVD
    "pissa_niter": _pissa_init,
    "olora": _olora_init,
    "loftq": _loftq_init,  # arg None: one iteration
}
#: PEFT ``init_lora_weights`` values lorakit knows but cannot honour (refused by name).
UNSUPPORTED_INITS = ("eva", "corda", "orthogonal")


def parse_init(init: str) -> tuple[str, object]:
    """``"pissa_niter_16"`` -> ``("pissa_niter", 16)``; ``"gaussian"`` -> ``("gaussian", "gaussian")``.

    Raises ValueError naming the known initialisers.
    """
    if isinstance(init, str) and init in INITIALIZERS:
        return init, (init if init in ("kaiming", "gaussian") else None)
    m = re.fullmatch(r"([a-z_]+)_(\d+)", init) if isinstance(init, str) else None
    if m and m.group(1) in INITIALIZERS and m.group(1) not in ("kaiming", "gaussian", "pissa", "olora"):
        k = int(m.group(2))
        if not 1 <= k <= 1000:
            raise ValueError(f"init {init!r}: the iteration count must be 1..1000 (PiSSA's paper uses 4 to 16)")
        return m.group(1), k
    known = sorted(INITIALIZERS)
    if init in UNSUPPORTED_INITS:
        raise ValueError(f"init {init!r} (a PEFT init_lora_weights value) is not supported by lorakit; use one of {known}")
    raise ValueError(f"init must be one of {known} (pissa_niter as 'pissa_niter_<K>', loftq also as 'loftq_<K>'), "
                     f"got {init!r}")


def initialize(layer: LoraLayer, adapter: Adapter, init: str) -> None:
    """Run initialiser ``init`` on a built, unattached adapter; a base change is staged on the adapter."""
    if adapter.lora_A.weight.is_meta:
        return
    name, arg = parse_init(init)
    with torch.no_grad():
        change = INITIALIZERS[name](layer, adapter, arg)
    if change is not None:
        adapter.base_change = change  # written by commit_base when attached


def base_owner(layers: Iterable[nn.Module]) -> str | None:
    """The adapter whose initialiser replaced base weights among ``layers`` (a model's modules or its
    LoRA layers), if any; there is at most one per model."""
    for layer in layers:
        if isinstance(layer, LoraLayer):
            for name, adapter in layer.adapters.items():
                if changed_base(adapter):
                    return name
    return None


def check_base_kept(model: nn.Module, doing: str, config: LoraConfig | None = None) -> None:
    """Refuse ``doing`` when it would run base weights an initialiser replaced as if they were the original.

    An adapter whose initialiser replaced base weights (PiSSA, OLoRA...) must be the only adapter on its
    model: the base model (``disabled``, base rows), and any other adapter, would see the residual.
    ``config``: the config of an adapter about to be added.
    """
    modules = [m for _, m in outside_adapters(model)]  # not model.modules(): that visits every adapter's insides
    owner = base_owner(modules)
    if owner is not None:
        raise ValueError(f"{doing}: adapter {owner!r} replaced the base weights (init "
                         f"{_config_of(model, owner).init!r}), so only it can run on this model; "
                         f"delete_adapter(model, {owner!r}) restores them, save_adapter(..., convert_to_lora=True) "
                         "writes it as a plain LoRA for the original base")
    if config is not None and parse_init(config.init)[0] not in ("kaiming", "gaussian"):
        names = sorted({n for m in modules if isinstance(m, LoraLayer) for n in m.adapters})
        if names:
            raise ValueError(f"init {config.init!r} replaces base weights, which adapters {names} of this model "
                             "use; add it to a model without adapters")


def _config_of(model: nn.Module, name: str) -> LoraConfig:
    return next(m.adapters[name].config for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters)


def check_rows(model: nn.Module, layers: list[LoraLayer], names: list[str | None]) -> None:
    """``per_row_adapters`` on ``model`` (whose LoRA layers are ``layers``): refuse base rows or other
    adapters beside a base-replacing adapter, and non-additive adapters (DoRA), whose update is not the
    stacked ``B·A`` the per-row path computes."""
    owner = base_owner(layers)
    if owner is not None and any(n != owner for n in names):
        check_base_kept(model, "per_row_adapters with rows of other adapters or of the base model")
    used = set(names)
    for layer in layers:
        for name in used & set(layer.adapters):
            if not layer.adapters[name].additive:
                raise ValueError(f"per_row_adapters: adapter {name!r} is a {type(layer.adapters[name]).__name__}"
                                 ", which per-row batching does not support; run it with use_adapter()")


def changed_base(adapter: Adapter) -> bool:
    """Whether ``adapter``'s initialiser replaced its layer's base weight (it holds ``init_A``/``init_B``)."""
    return "init_A" in adapter._buffers  # not hasattr: a miss goes through nn.Module.__getattr__ (slow)


def commit_base(layer: LoraLayer, adapter: Adapter) -> None:
    """Write a staged base change into the layer; keep ``(A0, B0)`` on the adapter for restore/convert."""
    change = adapter.__dict__.pop("base_change", None)
    if change is None:
        return
    layer.write_base(change.new_base)
    if change.A0 is None:
        return  # a change for good: nothing to restore or convert, other adapters may share the new base
    adapter.register_buffer("init_A", change.A0, persistent=False)
    adapter.register_buffer("init_B", change.B0, persistent=False)


def restore_base(layer: LoraLayer, adapter: Adapter) -> None:
    """Undo :func:`commit_base`: the base weight gets ``scaling * B0 @ A0`` back."""
    if not changed_base(adapter):
        return
    weight = layer.base_weight().float()
    back = layer.to_base_layout(adapter.scaling * (adapter.init_B.float() @ adapter.init_A.float()))
    layer.write_base(weight + back.to(weight.device))


def plain_lora_pair(adapter: Adapter) -> tuple[Tensor, Tensor]:
    """The plain LoRA pair, for the **original** base, equivalent to ``adapter`` on its layer's base.

    Unchanged base: ``plain_pair()``. Changed base (``original = new + s·B0·A0``):
    ``new + s·B·A = original + s·(B·A - B0·A0) = original + s·[B, -B0]·[A; A0]`` (rank 2r, same scaling).
    """
    if not adapter.additive:
        raise ValueError(f"a {type(adapter).__name__} is not a plain LoRA update and cannot be converted")
    A, B = adapter.plain_pair()
    if not changed_base(adapter):
        return A, B
    return torch.cat([A, adapter.init_A.to(A.dtype)]), torch.cat([B, -adapter.init_B.to(B.dtype)], dim=1)


# ----- adapter variants ------------------------------------------------------------------------------------
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
        # PEFT stores a convolution's magnitude as (1, d, 1, ...) and the others' as (d,)
        w0 = layer.base_layer.weight
        dora.file_shape = (1, -1, *[1] * (w0.dim() - 2)) if isinstance(layer, LoraConv) else (-1,)
        return dora

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
        norm = self.row_norm(layer.weight_matrix()).to(self.dtype)
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


#: adapter variants, tried in order; the first whose ``wanted(config)`` is true wraps the plain adapter.
VARIANTS: list[type[Adapter]] = [DoraAdapter]


def wrap_variant(layer: LoraLayer, adapter: Adapter, config: LoraConfig) -> Adapter:
    for variant in VARIANTS:
        if variant.wanted(config):
            return variant.wrap(layer, adapter)
    return adapter


# ----- LoRA+ -----------------------------------------------------------------------------------------------
def loraplus_param_groups(model: nn.Module, lr: float, ratio: float | None) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024, arXiv 2402.12354).

    The ``lora_B`` weights of every adapter (found by type, not by name) train at ``ratio * lr``; every
    other trainable parameter (``lora_A``, DoRA magnitudes, biases, ``modules_to_save`` copies) at ``lr``.
    ``ratio=None`` gives one group. Use it with any optimizer::

        torch.optim.AdamW(lorakit.loraplus_param_groups(model, lr=2e-4, ratio=16), weight_decay=0.0)
    """
    if not _finite_positive(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if ratio is not None and not _finite_positive(ratio):
        raise ValueError(f"ratio must be a positive finite number or None, got {ratio!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call lorakit.add_lora(model, config) first")
    if ratio is None:
        return [{"params": params, "lr": lr}]
    b_ids = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.lora_B.parameters()}
    groups = [{"params": [p for p in params if id(p) not in b_ids], "lr": lr},
              {"params": [p for p in params if id(p) in b_ids], "lr": lr * ratio}]
    return [g for g in groups if g["params"]]


def _finite_positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0
