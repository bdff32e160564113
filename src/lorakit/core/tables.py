"""The tables the successors of plain LoRA register into; core reads them and names none of them.

``import lorakit`` fills them once, through the ``register()`` of :mod:`lorakit.layers`, :mod:`lorakit.variants`,
:mod:`lorakit.ops` and :mod:`lorakit.save_guard`; importing a module registers nothing. Each table is
one way a new kind joins; below they are grouped by the step that reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class BaseChange:
    """What a base-changing initialiser did: ``original == new_base + scaling * B0 @ A0`` (in ``(d, k)``)."""

    new_base: Tensor  # base layout, any float dtype (LoraLayer.write_base casts or quantizes)
    A0: Tensor | None  # (r, k); None: the change is for good (LoftQ: the base becomes its quantized version)
    B0: Tensor | None  # (d, r)


@dataclass(frozen=True)
class Init:
    """One initialiser: ``fn(layer, adapter, arg) -> BaseChange | None`` (``arg``: the ``K`` of ``<name>_<K>``
    when ``counted``, else None). ``changes_base``: it replaces the base weight (the adapter must be alone on
    its model). ``to_peft(arg)`` / ``from_peft(raw)``: PEFT's spelling when it is not the name itself."""

    fn: Callable[..., BaseChange | None]
    counted: bool = False
    changes_base: bool = True
    to_peft: Callable[[Any], dict[str, Any]] | None = None
    from_peft: Callable[[dict[str, Any]], str] | None = None


def _kaiming(layer, adapter, arg) -> None:
    layer.init_adapter(adapter, "kaiming")  # the layer type's own: A random, B zero


def _gaussian(layer, adapter, arg) -> None:
    layer.init_adapter(adapter, "gaussian")


def _kaiming_peft(arg) -> dict[str, Any]:
    return {"init_lora_weights": True}  # PEFT's default init


#: ``LoraConfig.init`` names -> :class:`Init` (PiSSA, OLoRA, LoftQ join the two below).
INITIALIZERS: dict[str, Init] = {
    "kaiming": Init(_kaiming, changes_base=False, to_peft=_kaiming_peft),
    "gaussian": Init(_gaussian, changes_base=False),
}
#: PEFT ``init_lora_weights`` values lorakit knows but cannot honour (refused by name).
UNSUPPORTED_INITS = ("eva", "corda", "orthogonal")

# ----- building an adapter (LoraLayer.new_adapter, plan_adapter, LoraConfig) ----------------------------------
#: ``fn(module) -> LoraLayer subclass | None``, asked before the linear base case (embeddings, convolutions,
#: bitsandbytes' quantized linear layers).
LAYER_TYPES: list[Callable[[Any], type | None]] = []
#: ``fn(layer, r, scaling, config, module_name) -> Adapter | None``, asked before the layer type's own
#: ``make_adapter``: an A/B pair of another shape (fused slices).
PAIR_TYPES: list[Callable[..., Any]] = []
#: adapter classes tried in order: the first whose ``wanted(config)`` is true wraps the plain adapter the layer
#: type built, ``wrap(layer, plain) -> Adapter`` (DoRA, AdaLoRA's SVD form).
VARIANTS: list[type] = []
#: ``fn(model, config, name, planned_paths) -> [(path, layer, adapter, new_layer)]``: layers an adapter places
#: besides its ``target_modules``, built without touching the model (parameters, trainable tokens).
EXTRA_LAYERS: list[Callable[..., list[tuple]]] = []
#: ``fn(config)`` raising ValueError: checks of the config fields a variant owns (target_parameters, slices).
CONFIG_CHECKS: list[Callable[[Any], None]] = []

# ----- attached and running -----------------------------------------------------------------------------------
#: ``fn(model)`` run after an adapter is attached (save_pretrained guarded; a quantized base keeps a trainable
#: layout).
ON_ATTACH: list[Callable[[Any], None]] = []
#: ``[fn(module, x, *args, **kwargs)]``: a ``modules_to_save`` holder's output while its ``row_names`` say which
#: copy each batch row runs (``lorakit.ops.saved_rows``).
SAVED_ROWS: list[Callable[..., Any]] = []

# ----- checkpoints (lorakit.core.checkpoint) -------------------------------------------------------------------
#: another PEFT ``peft_type`` -> ``fn(raw, tensors) -> (raw, tensors)``, the exactly equivalent ``LORA``
#: checkpoint (AdaLoRA, trainable tokens alone).
PEFT_TYPES: dict[str, Callable[[dict, dict], tuple[dict, dict]]] = {}
#: ``fn(peft, tensors) -> (peft, tensors) | None``: a checkpoint written in another PEFT format where that
#: applies (trainable tokens alone: ``TRAINABLE_TOKENS``).
PEFT_WRITERS: list[Callable[[dict, dict], tuple[dict, dict] | None]] = []
#: ``fn(model, config, held, peft) -> paths``: writes the ``adapter_config.json`` field that names some of the
#: held ``(path, layer)`` (``target_parameters``); those paths are left out of ``target_modules``.
PEFT_TARGETS: list[Callable[..., set[str]]] = []
#: ``fn(model, adapter, tensors, peft, meta) -> (tensors, peft, meta)``: what ``convert_to_lora=True`` writes
#: instead (an adapter whose initialiser replaced the base, as the exactly equivalent plain LoRA for the
#: original base); ``peft`` and ``meta`` are None for ``lora_state_dict``.
CONVERSIONS: list[Callable[..., tuple]] = []
#: ``fn(model, held) -> dict``: more of lorakit's metadata, from the model and the ``(path, layer)`` pairs
#: holding the adapter (a classifier's class names, a QLoRA base's quantization).
EXPORT_METADATA: list[Callable[..., dict]] = []
#: more keys of lorakit's metadata -> check of the value (an allow-list: an unknown key is refused).
METADATA: dict[str, Callable[[Any], bool]] = {}
#: ``fn(config, tensors, weights_file) -> keys`` raising ``CheckpointError``: what a variant's tensors must satisfy
#: in any checkpoint, whatever model it goes into (DoRA: a magnitude for each pair); returns the ``lora_A`` keys
#: whose rows it vouches for instead of the config's rank (expert stacks: experts x rank).
TENSOR_CHECKS: list[Callable[..., set[str]]] = []
#: ``fn(model, config, tensors, weights_file)`` raising ``CheckpointError``: a checkpoint's tensors against the
#: model, before anything is allocated (the rows of targeted parameters).
LOAD_CHECKS: list[Callable[..., None]] = []
#: ``fn(model, planned, copies, tensors)``: shapes a load's new layers and ``modules_to_save`` copies (not
#: attached yet) to the checkpoint before its shapes are checked (a head with its own number of classes).
FIT_NEW: list[Callable[..., None]] = []

def parse_init(init: str) -> tuple[str, int | None]:
    """``"pissa_niter_16"`` -> ``("pissa_niter", 16)``; ``"olora"`` -> ``("olora", None)``.

    Raises ValueError naming the known initialisers.
    """
    if isinstance(init, str) and init in INITIALIZERS:
        return init, None
    m = re.fullmatch(r"([a-z_]+)_(\d+)", init) if isinstance(init, str) else None
    if m and m.group(1) in INITIALIZERS and INITIALIZERS[m.group(1)].counted:
        k = int(m.group(2))
        if not 1 <= k <= 1000:
            raise ValueError(f"init {init!r}: the iteration count must be 1..1000 (PiSSA's paper uses 4 to 16)")
        return m.group(1), k
    known = sorted(INITIALIZERS)
    if init in UNSUPPORTED_INITS:
        raise ValueError(f"init {init!r} (a PEFT init_lora_weights value) is not supported by lorakit; use one of {known}")
    counted = [f"'{n}_<K>'" for n in known if INITIALIZERS[n].counted]
    raise ValueError(f"init must be one of {known}" + (f" (also as {', '.join(counted)})" if counted else "")
                     + f", got {init!r}")
