"""QLoRA (Dettmers et al., 2023, arXiv 2305.14314): LoRA on a bitsandbytes 4-bit or 8-bit base layer.

The frozen base is bitsandbytes' own ``Linear4bit`` (NF4 or FP4 codes in blocks of 64 weights, one absmax
constant per block, optionally itself quantized: "double quantization") or ``Linear8bitLt`` (LLM.int8: int8
rows with one scale each). lorakit never quantizes by itself. LoRA wraps such a layer like any linear layer::

    h = base(x) + B(A(dropout(x))) * scaling        A: (r, k), B: (d, r), both full precision (fp32)

Only A and B train; gradients flow through the quantized base to the input (bitsandbytes' backward).

Merging into a quantized base is lossy: dequantize ``W``, add ``B @ A * scaling`` in fp32, quantize again.
Each quantized layer records what that cost (:func:`merge_errors`); unmerge goes the same way back and is
not exact either. To keep full precision, merge the adapter into the unquantized base instead (``lorakit
merge`` does that).

bitsandbytes is imported lazily (``lorakit[qlora]``): ``lorakit`` imports without it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.layers import LoraLayer, LoraLinear, changed_base, conv1d_type
from ..core.saved import SavedModule
from ..core.tables import EXPORT_METADATA, LAYER_TYPES, METADATA, ON_ATTACH
from ..core.targets import outside_adapters

EXTRA_HINT = "pip install 'lorakit[qlora]'"
HEAD_NAMES = ("lm_head", "classifier", "score")  # output heads: never quantized (they are trained or tied)


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an ImportError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"4/8-bit bases need bitsandbytes: {EXTRA_HINT}") from None
    return bitsandbytes


def quantized_base_types() -> tuple[type, ...]:
    """bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``, if bitsandbytes is already imported (never imported
    here: a model holding such layers has imported it)."""
    module = sys.modules.get("bitsandbytes.nn")
    if module is None:
        return ()
    return tuple(getattr(module, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(module, name))


# ----- the quantized weight, both ways ---------------------------------------------------------------------
def dequantize(layer: nn.Module) -> Tensor:
    """The fp32 weight ``(out, in)`` a ``Linear4bit`` / ``Linear8bitLt`` computes with."""
    bnb = require_bitsandbytes()
    weight = layer.weight
    if weight.dtype.is_floating_point:  # Linear8bitLt with has_fp16_weights, or not quantized yet
        return weight.detach().float()
    if isinstance(layer, bnb.nn.Linear4bit):
        _unpack_cpu_layout(layer)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # moved by the first forward
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()


def _unpack_cpu_layout(layer: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs at its first inference forward (eval mode, no
    grad) and then always runs it through an inference kernel without a backward. Dequantize, requantize and
    any forward that needs gradients need the standard layout back."""
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


def keep_trainable_layout(model: nn.Module) -> None:
    """Every bitsandbytes 4-bit layer of ``model`` gets the standard layout back and keeps it.

    Called when an adapter is attached: gradients flow back through *every* quantized layer, adapted or not,
    and a repacked one has no backward (bitsandbytes only warns; the adapters upstream of it then get zero
    gradients). This gives up bitsandbytes' AVX512-BF16 inference kernel on such CPUs.
    """
    types = quantized_base_types()
    if not types:
        return  # bitsandbytes not imported: no quantized layer here
    for _, module in outside_adapters(model):  # base layers; never inside an adapter
        if isinstance(module, types) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            _unpack_cpu_layout(module)


def set_quantized_weight(layer: nn.Module, weight: Tensor) -> None:
    """Quantize the fp weight ``(out, in)`` into ``layer`` with the layer's own settings (codes, blocks)."""
    bnb = require_bitsandbytes()
    old = layer.weight
    device = old.device
    w = weight.detach().to("cpu", torch.float32)
    if isinstance(layer, bnb.nn.Linear4bit):
        state = old.quant_state
        new = bnb.nn.Params4bit(w, requires_grad=False, quant_type=state.quant_type, blocksize=state.blocksize,
                                compress_statistics=state.nested, quant_storage=old.quant_storage, module=layer)
    else:
        new = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        layer.state.CB = layer.state.SCB = None  # the next forward takes the new codes and scales
    layer.weight = new.to(device)


def quantized_linear(linear: nn.Module, bits: int, quant_type: str, double_quant: bool,
                     compute_dtype: torch.dtype | None, weight: Tensor | None = None) -> nn.Module:
    """A bitsandbytes layer computing what ``linear`` (``nn.Linear`` or GPT-2 ``Conv1D``) computes
    (``weight``: an ``(out, in)`` weight to use instead of the layer's)."""
    bnb = require_bitsandbytes()
    if weight is None:
        weight = linear.weight.detach()
        if not isinstance(linear, nn.Linear):  # Conv1D stores (in, out)
            weight = weight.T
    out_f, in_f = weight.shape
    bias = linear.bias is not None
    if bits == 4:
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype or weight.dtype,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(weight.to("cpu", torch.float32), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, module=q).to(weight.device)
        q.support_avx512bf16_for_cpu = False  # no inference-only repacking: training after an evaluation works
    else:  # LLM.int8 with the outlier threshold transformers uses by default
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float32), requires_grad=False,
                                     has_fp16_weights=False).to(weight.device)
    if bias:
        q.bias = linear.bias  # the same parameter: trained biases (bias="all" / "lora_only") keep training
    return q


def weight_bytes(layer: nn.Module) -> int:
    """Bytes a (quantized or plain) linear layer's weight takes, quantization constants included."""
    weight = layer.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit: absmax per block (+ its own constants when double-quantized), code table
        parts = [state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in parts)
    scb = getattr(weight, "SCB", None)
    if scb is None and hasattr(layer, "state"):
        scb = layer.state.SCB
    if scb is not None:  # 8-bit: one scale per row
        total += scb.numel() * scb.element_size()
    return total


# ----- the LoRA layer ----------------------------------------------------------------------------------------
@dataclass
class QuantError:
    """What one requantization cost: the quantized weight minus the exact fp32 one."""

    max_abs: float  # largest weight error
    relative: float  # ||error||_F / ||change||_F (change: B·A·scaling for plain LoRA): the share lost to rounding


class LoraQuantLinear(LoraLinear):
    """LoRA on bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``: forward as :class:`LoraLinear`; the base weight
    reads dequantized and writes requantized (``base_weight`` / ``write_base``), so merge and unmerge fold the
    adapter in or out in fp32 and requantize (lossy: see :attr:`merge_error`), and DoRA reads the dequantized
    weight."""

    def __init__(self, base_layer: nn.Module):
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.merge_error: QuantError | None = None  # set by the last merge or unmerge

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if torch.is_grad_enabled():
            _unpack_cpu_layout(self.base_layer)  # e.g. a layer transformers loaded, after an eval forward
        return super().forward(x, *args, **kwargs)

    def base_weight(self) -> Tensor:
        return dequantize(self.base_layer)

    def write_base(self, weight: Tensor) -> None:
        """Requantize ``weight`` into the base (lossy) and record the error it cost in :attr:`merge_error`."""
        before = dequantize(self.base_layer)
        target = weight.detach().float().to(before.device)
        set_quantized_weight(self.base_layer, target)
        error = dequantize(self.base_layer) - target
        self.merge_error = QuantError(error.abs().max().item(),
                                      (error.norm() / (target - before).norm().clamp_min(1e-30)).item())

    def quantization(self) -> str | None:
        """The :data:`PRESETS` name of the base (a 4-bit type no preset names comes out as itself)."""
        base = self.base_layer
        return getattr(base.weight, "quant_type", None) if type(base).__name__ == "Linear4bit" else "int8"

    def new_adapter(self, config, module_name):
        adapter = super().new_adapter(config, module_name)
        if "base_change" in adapter.__dict__:  # PiSSA, OLoRA: planned, so nothing has changed yet
            raise ValueError(f"{module_name}: init {config.init!r} replaces the base weight by a residual, which "
                             "a quantized base cannot hold exactly; add the adapter to the full-precision model")
        return adapter


def merge_errors(model: nn.Module) -> dict[str, QuantError]:
    """Per quantized LoRA layer (path): what its last merge or unmerge cost in weight error."""
    return {path: m.merge_error for path, m in model.named_modules()
            if isinstance(m, LoraQuantLinear) and m.merge_error is not None}


# ----- quantize a model ------------------------------------------------------------------------------------
QUANT_TYPES = ("nf4", "fp4")
# ``lorakit train --quantize NAME``: QLoRA's recipe (NF4 + double quantization), FP4, or LLM.int8
PRESETS = {"nf4": {"bits": 4, "quant_type": "nf4"}, "fp4": {"bits": 4, "quant_type": "fp4"}, "int8": {"bits": 8}}


def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip_modules: list[str] | None = None) -> nn.Module:
    """Swap the frozen linear layers of ``model`` for bitsandbytes' in place: QLoRA's base.

    ``bits=4``: ``Linear4bit`` with ``quant_type`` ``"nf4"`` (4-bit NormalFloat) or ``"fp4"``, block constants
    quantized again when ``double_quant``; the matmul runs in ``compute_dtype`` (default: the weight's dtype).
    ``bits=8``: ``Linear8bitLt`` (LLM.int8, outlier threshold 6.0). The output head (``lm_head``, the output
    embeddings, ``classifier``/``score``) and ``skip_modules`` (names or suffixes) stay as they are; so do
    ``modules_to_save`` copies. Layers LoRA already wraps get a quantized base under the same adapters.
    Everything is checked before the first layer changes. Returns ``model``.
    """
    if type(bits) is not int or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {'|'.join(QUANT_TYPES)}, got {quant_type!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
    if skip_modules is not None and not (isinstance(skip_modules, list | tuple)
                                         and all(isinstance(s, str) and s for s in skip_modules)):
        raise ValueError(f"skip_modules must be a list of module names, got {skip_modules!r}")
    require_bitsandbytes()
    plan = _quantize_plan(model, list(skip_modules or ()))
    if (bits, quant_type, double_quant) != (4, LOFTQ_PRESET, True):
        for path, module in plan:
            fitted = [n for n, a in getattr(module, "adapters", {}).items() if a.config.init.startswith("loftq")]
            if fitted:
                raise ValueError(f"{path}: adapter {fitted[0]!r} was fitted by LoftQ to NF4 with double quantization; "
                                 f"quantize with those settings, not bits={bits}, quant_type={quant_type!r}, "
                                 f"double_quant={double_quant}")
    # ---- checked: from here on the model changes ----
    for path, module in plan:
        if isinstance(module, LoraLinear):
            _rewrap(model, path, module, quantized_linear(module.base_layer, bits, quant_type, double_quant,
                                                          compute_dtype))
        else:
            _set_child(model, path, quantized_linear(module, bits, quant_type, double_quant, compute_dtype))
    return model


def _quantize_plan(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """(path, module) of the plain linear layers and the LoRA wrappers of plain linear layers to quantize."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    linear_types = (nn.Linear,) + ((conv1d_type(),) if conv1d_type() is not None else ())
    plan, closed = [], []  # closed: wrappers and modules_to_save holders, whose insides are never swapped
    for path, module in model.named_modules():
        if any(path.startswith(c) for c in closed):
            continue
        if isinstance(module, LoraLayer | SavedModule):
            closed.append(path + ".")
        if (module is head or any(p in HEAD_NAMES for p in path.split("."))
                or any(path == s or path.endswith("." + s) for s in skip)):
            continue
        if isinstance(module, LoraLayer):
            if type(module) is not LoraLinear or type(module.base_layer) not in linear_types:
                continue  # already quantized, or not a linear layer
            if module.merged:
                raise ValueError(f"{path}: adapter {module.merged} is merged; unmerge(model) before quantize")
            if module.row_plan is not None:
                raise ValueError(f"{path}: quantize inside per_row_adapters() is not supported")
            held = [n for n, a in module.adapters.items() if changed_base(a)]
            if held:
                raise ValueError(f"{path}: adapter {held[0]!r} replaced the base weight by a residual (init "
                                 f"{module.adapters[held[0]].config.init!r}), which a quantized base cannot hold "
                                 "exactly; save_adapter(..., convert_to_lora=True) gives a plain LoRA to use instead")
            plan.append((path, module))
        elif type(module) in linear_types:
            plan.append((path, module))
    for path, module in plan:
        w = module.base_layer.weight if isinstance(module, LoraLayer) else module.weight
        if w.is_meta:
            raise ValueError(f"{path}: weights on the meta device cannot be quantized; load real weights first")
        if not torch.isfinite(w).all():
            raise ValueError(f"{path}: weight has non-finite values (nan/inf); nothing was quantized")
    if not plan:
        raise ValueError("quantize: no linear layer to quantize (output heads and skip_modules are left out)")
    return plan


def _rewrap(model: nn.Module, path: str, old: LoraLinear, base: nn.Module) -> None:
    """A :class:`LoraQuantLinear` over ``base`` holding ``old``'s adapters and state."""
    new = LoraQuantLinear(base)
    new.adapters, new.active, new.disabled = old.adapters, old.active, old.disabled
    _set_child(model, path, new)


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----- LoftQ ----------------------------------------------------------------------------------------------
LOFTQ_PRESET = "nf4"  # LoftQ fits the adapter to this quantization: train with --quantize nf4 / quantize() defaults


# ----- joining core's tables ---------------------------------------------------------------------------------
def _quantized_layer_type(module: nn.Module) -> type[LoraLayer] | None:
    types = quantized_base_types()  # bitsandbytes' layers subclass nn.Linear: asked before the built-in table
    return LoraQuantLinear if types and isinstance(module, types) else None


def export_quantization(model: nn.Module, held: list) -> dict:
    """Core's ``EXPORT_METADATA`` entry: ``{"quantization": name}``, the :data:`PRESETS` name of the 4/8-bit base
    the adapter was trained on (QLoRA), when all its quantized layers share one."""
    found = {m.quantization() for _, m in held if isinstance(m, LoraQuantLinear)}
    return {"quantization": found.pop()} if len(found) == 1 and found <= set(PRESETS) else {}


def register() -> None:
    """Join core's tables: bitsandbytes' layers wrap as :class:`LoraQuantLinear`, attaching an adapter keeps
    4-bit layers trainable, checkpoints may record the :data:`PRESETS` names."""
    if _quantized_layer_type not in LAYER_TYPES:
        LAYER_TYPES.append(_quantized_layer_type)
    if keep_trainable_layout not in ON_ATTACH:
        ON_ATTACH.append(keep_trainable_layout)
    if export_quantization not in EXPORT_METADATA:
        EXPORT_METADATA.append(export_quantization)
    METADATA["quantization"] = lambda v: isinstance(v, str) and v in PRESETS  # a QLoRA adapter's base
