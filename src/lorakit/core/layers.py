"""LoRA layers (Hu et al., 2021, arXiv 2106.09685).

A wrapped layer computes ``h = base(x) + B(A(dropout(x))) * scaling`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). ``A`` maps the layer input to rank ``r``; ``B`` maps rank ``r`` to the
layer output and starts at zero, so a fresh adapter leaves the output bit-identical. The base layer
sits untouched in ``base_layer``; its weight changes only through an explicit ``merge``.

Shapes for a linear layer with ``k`` inputs and ``d`` outputs: ``lora_A.weight`` is ``(r, k)``,
``lora_B.weight`` is ``(d, r)`` and ``delta_weight() = B @ A * scaling`` is ``(d, k)``.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import LoraConfig
from .tables import INITIALIZERS, LAYER_TYPES, PAIR_TYPES, VARIANTS, parse_init


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def init_pair(A: Tensor, B: Tensor, rank: int, init: str) -> None:
    """LoRA's start: ``A`` Kaiming-uniform (``gaussian``: N(0, 1/r)), ``B`` zero, so the update is zero.
    Weights on the meta device are left alone (they are filled by a later load)."""
    if A.is_meta:
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)


class Adapter(nn.Module):
    """One adapter on one layer: ``lora_A``, ``lora_B``, dropout and scaling together.

    The methods below the forward are the variant seam (contract in :mod:`lorakit.variants`): a variant
    (DoRA, ...) is a subclass that overrides them, so :class:`LoraLayer`, checkpoints and the per-row path
    never ask which one they hold.
    """

    #: the layer output is ``base(x) + B·A·x·scaling`` with (A, B) from :meth:`plain_pair`: per-row stacking,
    #: combining and plain-LoRA export may rely on that pair alone. Variants that change more set it False.
    additive = True

    def __init__(self, lora_A: nn.Module, lora_B: nn.Module, dropout: float, scaling: float, config: LoraConfig):
        super().__init__()
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.config = config  # the adapter's LoraConfig, shared by all its layers (read-only)

    @property
    def rank(self) -> int:
        return self.lora_B.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_B.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def add_to(self, out: Tensor, x: Tensor, inplace: bool = False) -> Tensor:
        """``out + self(x)``, with B's product, the scaling and the sum in one GEMM where B is a plain
        ``nn.Linear`` without hooks: ``addmm(out, A(dropout(x)), B.T, alpha=scaling)`` (shapes
        ``(n, d) + (n, r) @ (r, d)``). ``inplace`` writes into ``out`` (for outputs nothing else holds, with
        no autograd graph recorded): no new ``(n, d)`` tensor at all.
        """
        A, B = self.lora_A, self.lora_B
        plain = type(self).forward is Adapter.forward and type(B) is nn.Linear  # not sliced, not FSDP-wrapped
        if not plain or _hooked(B) or out.dtype != B.weight.dtype:
            return out + self(x).to(out.dtype)
        if self.training:  # dropout is the identity in eval mode
            x = self.dropout(x)
        # a plain A is applied as a function: the module call costs more than the (n, r) product at decode sizes
        a = F.linear(x, A.weight, A.bias) if type(A) is nn.Linear and not _hooked(A) else A(x)  # (..., r)
        a2d = a.reshape(-1, a.shape[-1])
        if inplace and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(a2d, B.weight.T, alpha=self.scaling)
            return out
        return torch.addmm(out.reshape(-1, out.shape[-1]), a2d, B.weight.T, alpha=self.scaling).view(out.shape)

    # ----- variant seam: forward, merge, checkpoint ---------------------------------------------------------
    def layer_output(self, layer: LoraLayer, out: Tensor, x: Tensor, inplace: bool) -> Tensor:
        """The layer's output with this adapter: ``out`` is ``layer.base_layer(x)`` (bias included)."""
        return self.add_to(out, _cast(x, self.dtype), inplace)

    def merged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """Base weight (fp32, base layout) with this adapter folded in."""
        return weight + layer.to_base_layout(self.delta_matrix())

    def unmerged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """Inverse of :meth:`merged_weight` (fp32, base layout)."""
        return weight - layer.to_base_layout(self.delta_matrix())

    def extra_tensors(self) -> dict[str, Tensor]:
        """Checkpoint tensors besides A and B: key suffix after the module path -> tensor (saved detached,
        loaded by copy after a shape check)."""
        return {}

    @property
    def row_batched(self) -> bool:
        """Whether the per-row path and the adapter pool can run this adapter: additive, or giving a
        :meth:`row_scale`."""
        return self.additive

    def row_scale(self, layer: LoraLayer) -> Tensor | None:
        """The per-output factor ``f: (d,)`` (fp32) with which row ``i`` of a per-row batch computes
        ``base(x) + (f - 1)·(base(x) - bias) + f·s·B·A·x`` ((A, B) from :meth:`plain_pair`); None: ``f = 1``,
        the plain update. Fixed while the base and the adapter are (computed once per context or pool slot)."""
        return None

    def export_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint holds for this adapter: key suffix after the module path -> tensor, in PEFT's
        layout. A variant whose own weights are not PEFT's ``lora_A``/``lora_B`` writes its :meth:`plain_pair`."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight, **self.extra_tensors()}

    def export_pattern(self, alpha: float) -> tuple[int, float] | None:
        """``(rank, alpha)`` of the exported pair for ``rank_pattern`` / ``alpha_pattern`` when they are not
        the config's (``alpha``: the config's for this module); None: they are."""
        return None

    def delta_matrix(self) -> Tensor:
        """``B @ A * scaling`` as a ``(d, k)`` fp32 matrix."""
        A, B = self.plain_pair()
        return (B.float() @ A.float()) * self.scaling

    def plain_pair(self) -> tuple[Tensor, Tensor]:
        """(A, B) as matrices ``(r, k)`` and ``(d, r)``: the update is ``B @ A * scaling`` (flattened
        over the kernel for convolutions; ``k`` = vocabulary size for embeddings)."""
        A, B = self.lora_A.weight, self.lora_B.weight
        if isinstance(self.lora_A, nn.Embedding):
            A = A.T
        return A.flatten(1), B.flatten(1)

    def load_pair(self, A: Tensor, B: Tensor) -> None:
        """Set the weights from matrices in :meth:`plain_pair`'s form."""
        with torch.no_grad():
            if isinstance(self.lora_A, nn.Embedding):
                A = A.T
            self.lora_A.weight.copy_(A.reshape(self.lora_A.weight.shape))
            self.lora_B.weight.copy_(B.reshape(self.lora_B.weight.shape))


class LoraLayer(nn.Module):
    """Wraps a base layer and holds its named adapters; subclasses say how to build and merge them."""

    lora_target = True  # named in target_modules (False: placed by another config field, e.g. trainable tokens)
    routes_rows = False  # True: per-row batches hand the layer the rows' adapter names (MoE experts group tokens)
    stacks_rows = True  # per-row batches and the pool stack its adapters' B·A; False: run them by loop (convs)
    takes_ids = False  # its input is token ids (embeddings): per-row batches gather rows of A, not x @ A

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        self.row_plan = None  # set by lorakit.ops (per_row_adapters, the pool): .output(layer, out, x) per row
        # outputs of these base types are fresh tensors: the update may be added into them in place
        self.fresh_output = type(base_layer) is nn.Linear or type(base_layer) is conv1d_type()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:  # disabling wins over everything, per-row adapters included
            return out
        if self.row_plan is not None:
            return self.row_plan.output(self, out, x)
        if self.active is None or self.active in self.merged:
            return out
        adapter = self.adapters[self.active]
        # a forward hook on the base layer may keep or return a view of ``out``: then never write into it
        inplace = self.fresh_output and not _hooked(self.base_layer) and not torch.is_grad_enabled()
        return adapter.layer_output(self, out, x, inplace)

    @property
    def weight(self) -> Tensor:
        """The base weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base bias (so code that reads ``module.bias`` keeps working); absent where the base has none."""
        return self.base_layer.bias

    # ----- geometry that variants read (plain ``(d, k)`` form: d outputs, k inputs) -------------------------
    def as_matrix(self, weight: Tensor) -> Tensor:
        """A tensor in the layout of ``base_layer.weight`` -> its ``(d, k)`` form (inverse of to_base_layout)."""
        return weight

    def base_weight(self) -> Tensor:
        """The base weight, detached, in its own layout (a quantized base layer dequantizes here)."""
        return self.base_layer.weight.detach()

    def write_base(self, weight: Tensor) -> None:
        """Set the base weight from a tensor in its layout (any float dtype; a quantized base requantizes)."""
        with torch.no_grad():
            self.base_layer.weight.copy_(weight.to(self.base_layer.weight.dtype))

    def weight_matrix(self) -> Tensor:
        """The base weight as a ``(d, k)`` matrix (detached)."""
        return self.as_matrix(self.base_weight())

    def feature_view(self, v: Tensor) -> Tensor:
        """A per-output-feature vector ``(d,)`` shaped to broadcast against the layer's output."""
        return v

    # ----- checkpoint layout (PEFT's keys after the module path) -------------------------------------------
    def file_tensors(self, adapter: Adapter) -> dict[str, Tensor]:
        """Key suffix -> tensor written for ``adapter`` (the adapter says what it exports)."""
        return adapter.export_tensors()

    def file_slots(self, adapter: Adapter) -> dict[str, tuple[Tensor, bool]]:
        """Key suffix -> (tensor a load fills, whether the file holds it transposed); suffixes under
        ``base_layer.`` are optional in a file."""
        slots = {"lora_A.weight": (adapter.lora_A.weight.data, False), "lora_B.weight": (adapter.lora_B.weight.data, False)}
        return slots | {k: (t.data, False) for k, t in adapter.extra_tensors().items()}

    # ----- building adapters ------------------------------------------------------------------------------
    def new_adapter(self, config: LoraConfig, module_name: str) -> Adapter:
        """Build one adapter for this layer without attaching it: the A/B pair of the first entry of
        :data:`~lorakit.core.tables.PAIR_TYPES` that gives one (fused slices), else the layer type's own
        (:meth:`make_adapter`); initialised by ``config.init`` (an initialiser may stage a new base weight
        on the adapter, written by :meth:`attach`), then wrapped by the first variant in
        :data:`~lorakit.core.tables.VARIANTS` that wants the config (DoRA, ...)."""
        r, scaling = config.rank_for(module_name), config.scaling(module_name)
        adapter = next((a for build in PAIR_TYPES if (a := build(self, r, scaling, config, module_name)) is not None),
                       None)
        if adapter is None:
            adapter = self.make_adapter(r, scaling, config, module_name)
        if not adapter.lora_A.weight.is_meta:
            name, arg = parse_init(config.init)
            with torch.no_grad():
                change = INITIALIZERS[name].fn(self, adapter, arg)
            if change is not None:
                adapter.base_change = change  # written by attach
        wrap = next((v for v in VARIANTS if v.wanted(config)), None)
        return adapter if wrap is None else wrap.wrap(self, adapter)

    def attach(self, name: str, adapter: Adapter) -> None:
        """Hold ``adapter`` as ``name``; a base weight its initialiser staged (PiSSA, OLoRA...) is written now,
        and ``(A0, B0)`` kept on the adapter (non-persistent buffers) for :meth:`release` and conversion."""
        change = adapter.__dict__.pop("base_change", None)
        if change is not None:
            self.write_base(change.new_base)
            if change.A0 is not None:  # None: a change for good, nothing to restore or convert
                adapter.register_buffer("init_A", change.A0, persistent=False)
                adapter.register_buffer("init_B", change.B0, persistent=False)
        self.adapters[name] = adapter

    def release(self, name: str) -> Adapter:
        """Remove adapter ``name`` (unmerged); a base weight its initialiser replaced gets
        ``scaling * B0 @ A0`` back."""
        adapter = self.adapters[name]
        if changed_base(adapter):
            weight = self.base_weight().float()
            back = self.to_base_layout(adapter.scaling * (adapter.init_B.float() @ adapter.init_A.float()))
            self.write_base(weight + back.to(weight.device))
        del self.adapters[name]
        return adapter

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> Adapter:
        adapter = self.new_adapter(config, module_name)
        self.attach(name, adapter)
        return adapter

    def make_adapter(self, r: int, scaling: float, config: LoraConfig, module_name: str) -> Adapter:
        raise NotImplementedError

    def init_adapter(self, adapter: Adapter, init: str) -> None:
        """A random (Kaiming-uniform, or N(0, 1/r) for ``gaussian``), B zero."""
        init_pair(adapter.lora_A.weight, adapter.lora_B.weight, adapter.rank, init)

    def delta_weight(self, name: str) -> Tensor:
        """The update ``B @ A * scaling`` in fp32, in the layout of ``base_layer.weight``."""
        return self.to_base_layout(self.adapters[name].delta_matrix())

    def merged_weight(self, name: str) -> Tensor:
        """The base weight with adapter ``name`` folded in: computed in fp32 (by the adapter, so a variant
        decides how), cast to the weight's dtype; the layer is unchanged."""
        weight = self.base_weight()
        return self.adapters[name].merged_weight(self, weight.float()).to(weight.device, weight.dtype)

    def to_base_layout(self, delta: Tensor) -> Tensor:
        """``(d, k)`` update -> the shape and layout of ``base_layer.weight``."""
        return delta

    # ----- merge -----------------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (unchecked: see ``lorakit.merge``)."""
        self.write_base(self.merged_weight(name))
        self.merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update, last merged first."""
        while self.merged:
            name = self.merged.pop()
            self.write_base(self.adapters[name].unmerged_weight(self, self.base_weight().float()))


class LoraLinear(LoraLayer):
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``: fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape

    def make_adapter(self, r, scaling, config, module_name):
        kw = factory_kwargs(self.base_layer.weight)
        A = nn.Linear(self.in_features, r, bias=False, **kw)
        B = nn.Linear(r, self.out_features, bias=False, **kw)
        return Adapter(A, B, config.dropout, scaling, config)

    def to_base_layout(self, delta):
        return delta.T if self.fan_in_fan_out else delta

    def as_matrix(self, weight):
        return weight.T if self.fan_in_fan_out else weight


def conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D``, if transformers is already imported (never imported here)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def lora_layer_type(module: nn.Module) -> type[LoraLayer] | None:
    """Which LoRA wrapper fits ``module`` (None: not adaptable): the registered layer types first
    (:data:`~lorakit.core.tables.LAYER_TYPES`: embeddings, convolutions, quantized bases, which subclass
    ``nn.Linear``), then the base case, ``nn.Linear`` and GPT-2's ``Conv1D``."""
    if isinstance(module, LoraLayer):
        return None
    for fits in LAYER_TYPES:
        if (lora_type := fits(module)) is not None:
            return lora_type
    conv1d = conv1d_type()
    return LoraLinear if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)) else None


def is_linear_like(module: nn.Module) -> bool:
    layer_type = lora_layer_type(module)
    return layer_type is not None and issubclass(layer_type, LoraLinear)


def factory_kwargs(weight: Tensor) -> dict:
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype or not x.is_floating_point() else x.to(dtype)


def changed_base(adapter: Adapter) -> bool:
    """Whether ``adapter``'s initialiser replaced its layer's base weight (it holds ``init_A``/``init_B``)."""
    return "init_A" in adapter._buffers  # not hasattr: a miss goes through nn.Module.__getattr__ (slow)
