"""Which parameters ``LoraConfig.target_parameters`` adapts, and how that field joins core.

The parameter layers themselves (PEFT's ``ParamWrapper`` layout, expert stacks) are in :mod:`.params`; this
module finds their targets and plugs the field into core's tables (:func:`register`):

- :data:`~lorakit.core.tables.CONFIG_CHECKS`: the field's own checks (no dropout, no DoRA, plain inits).
- :data:`~lorakit.core.tables.EXTRA_LAYERS`: the parameter layers an adapter places (planned, model untouched).
- :data:`~lorakit.core.tables.TENSOR_CHECKS`: a checkpoint's expert stacks (``E*r`` rows; each parameter's own
  rank from ``rank_pattern`` by parameter path, :func:`parameter_stacks`) exempt from the rank check against the
  config, whatever model the checkpoint goes into.
- :data:`~lorakit.core.tables.LOAD_CHECKS`: each targeted parameter's rows in a checkpoint, checked before
  anything is allocated.
- :data:`~lorakit.core.tables.PEFT_TARGETS`: the names written to ``adapter_config.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import permutations
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from ..core.checkpoint import CONFIG_NAME, PREFIX, CheckpointError
from ..core.config import LoraConfig, short_repr
from ..core.layers import LoraLayer, lora_layer_type
from ..core.saved import SavedModule
from ..core.tables import CONFIG_CHECKS, EXTRA_LAYERS, LOAD_CHECKS, PEFT_TARGETS, TENSOR_CHECKS
from ..core.targets import block_index, selected

ALL_EXPERTS = "all-experts"  # target_parameters: every 3-D parameter (fused expert stacks); saved as the names
#: ``"default"`` -> the layer type that adapts parameters: ``cls(module, parameter_names)`` (:mod:`.params` fills it)
PARAMETER_LAYERS: dict[str, Callable[[nn.Module, list[str]], LoraLayer]] = {}


def check_config(config: LoraConfig) -> None:
    """``target_parameters``: None, ``"all-experts"`` or a non-empty list of names; as in PEFT, no dropout, no
    DoRA and no initialiser that reads the base. A one-line ValueError naming the field otherwise."""
    value = config.target_parameters
    if value is None:
        return
    if not (value == ALL_EXPERTS or (isinstance(value, list) and value and all(isinstance(s, str) and s for s in value))):
        raise ValueError(f"target_parameters must be a non-empty list of parameter names or {ALL_EXPERTS!r}, got "
                         f"{short_repr(value)}")
    if config.dropout != 0:
        raise ValueError(f"dropout={config.dropout} cannot be used with target_parameters (an update of the weight "
                         "itself has no input to drop; PEFT refuses it too); use dropout=0")
    if config.use_dora:
        raise ValueError("use_dora cannot be used with target_parameters (as in PEFT)")
    if config.init not in ("kaiming", "gaussian"):
        raise ValueError(f"init {config.init!r} cannot be used with target_parameters; use 'kaiming' or 'gaussian'")


def _parameter_owners(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, owner) for every module that may own targeted parameters; at ``path`` sits the owner or the
    parameter layer that already wraps it."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, LoraLayer):
            if isinstance(child, tuple(PARAMETER_LAYERS.values())):
                yield path, child.base_layer
            continue  # a wrapped layer's own weight is adapted as a module
        if isinstance(child, SavedModule) or lora_layer_type(child) is not None:
            continue  # modules_to_save copies; layers adapted as modules
        yield path, child
        yield from _parameter_owners(child, path)


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """Module path -> names of its parameters ``config.target_parameters`` adapts, in model order.

    A listed name matches ``<module path>.<parameter>`` exactly or as a suffix at a ``.`` boundary (as PEFT);
    ``"all-experts"`` takes every 3-D floating parameter. ``layers`` and ``exclude_modules`` apply to the
    module path. Raises ValueError naming the problem when nothing matches or a match is not 2-D/3-D.
    """
    spec = config.target_parameters
    if spec is None:
        return {}
    found: dict[str, list[str]] = {}
    for path, owner in _parameter_owners(model):
        if config.exclude_modules is not None and selected(path, config.exclude_modules):
            continue
        if config.layers is not None and block_index(path, config.layers_pattern) not in config.layers:
            continue
        names = []
        for name, p in owner.named_parameters(recurse=False):
            key = f"{path}.{name}"
            if spec == ALL_EXPERTS:
                hit = p.dim() == 3 and p.is_floating_point()
            else:
                hit = selected(key, spec)
                if hit and p.dim() not in (2, 3):
                    raise ValueError(f"target_parameters matches {key} of shape {tuple(p.shape)}; only 2-D and "
                                     "3-D parameters can be adapted")
            if hit:
                names.append(name)
        if names:
            found[path] = names
    if not found:
        sample = [f"{p}.{n}" for p, o in _parameter_owners(model) for n, t in o.named_parameters(recurse=False)
                  if t.dim() == 3][:4]
        raise ValueError(f"no parameter matches target_parameters={spec!r}"
                         + (f" with layers={config.layers}" if config.layers is not None else "")
                         + f"; 3-D parameters of this model: {sample or '(none)'}")
    return found


def plan_parameters(model: nn.Module, config: LoraConfig, name: str, module_paths: list[str]) -> list[tuple]:
    """Core's ``EXTRA_LAYERS`` entry: ``(path, layer, adapter, new_layer)`` for every module whose parameters
    ``config`` adapts (the parameter layer type of :data:`PARAMETER_LAYERS`); the model is not touched."""
    planned = []
    for path, names in find_parameter_targets(model, config).items():
        if path in module_paths:
            raise ValueError(f"{path} is selected by both target_modules and target_parameters; pick one")
        module = model.get_submodule(path)
        new_layer = not isinstance(module, LoraLayer)
        layer = PARAMETER_LAYERS["default"](module, names) if new_layer else module
        if sorted(layer.parameter_names) != sorted(names):
            raise ValueError(f"target_parameters selects {sorted(names)} of {path}, whose other adapters adapt "
                             f"{sorted(layer.parameter_names)}; every adapter must target the same parameters of a "
                             "module (as in PEFT)")
        planned.append((path, layer, layer.new_adapter(config, path), new_layer))
    return planned


def check_ranks(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], weights_file: Path) -> None:
    """Core's ``LOAD_CHECKS`` entry: the A of a parameter with ``E`` experts has ``E*r`` rows (PEFT's nesting:
    the module's last targeted parameter at its path, each earlier one a ``.base_layer`` deeper), checked before
    any adapter is allocated."""
    for path, names in find_parameter_targets(model, config).items():
        owner = model.get_submodule(path)
        owner = getattr(owner, "base_layer", owner)
        for i, name in enumerate(names):
            key = f"{PREFIX}{path}{'.base_layer' * (len(names) - 1 - i)}.lora_A.weight"
            param = getattr(owner, name)
            rows = config.rank_for(f"{path}.{name}") * (param.shape[0] if param.dim() == 3 else 1)
            if key not in tensors:
                raise CheckpointError(f"{weights_file}: no lora_A tensor for parameter {path}.{name} (expected key {key})")
            if tensors[key].dim() != 2 or tensors[key].shape[0] != rows:
                raise CheckpointError(f"{weights_file}: tensor {key} has shape {tuple(tensors[key].shape)}, but "
                                      f"{CONFIG_NAME} gives {rows} rows (rank x experts) for {path}.{name}")


# ----- expert stacks in a checkpoint, without the model -------------------------------------------------------
class Stack(NamedTuple):
    """One ``target_parameters`` pair of a checkpoint: its parameter (None: two fit, see below), rank, expert
    count and scaling."""

    parameter: str | None
    rank: int
    experts: int
    scaling: float


def parameter_stacks(config: LoraConfig, rows: dict[str, int]) -> dict[str, Stack]:
    """Which targeted parameter each ``target_parameters`` pair of a checkpoint is, from the file alone.

    ``rows``: checkpoint stem (module path, ``.base_layer`` repeated for PEFT's nesting) -> rows of its
    ``lora_A`` (``E*r``: experts x rank). Returns stem -> :class:`Stack` for the stems of modules whose
    parameters the config names; ``parameter`` is None where two of them fit the same depth (equal ranks:
    the numbers are the same either way). ``rank_pattern`` is keyed by ``<module>.<parameter>``, as in PEFT.

    The nesting order is the module's parameter order, which the file does not hold; every order of the
    named parameters is tried and the ones where all depths share one expert count ``E`` kept: ``E`` is then
    ``sum(rows) / sum(ranks)`` whatever the order, so each depth's rank is determined. A module whose pairs fit
    no order is left out (the caller reports it).
    """
    spec = config.target_parameters
    if not isinstance(spec, list):
        return {}  # "all-experts": the names are the model's
    modules: dict[str, dict[int, str]] = {}
    for stem in rows:
        module, depth = stem, 0
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        modules.setdefault(module, {})[depth] = stem
    out = {}
    for module, stems in modules.items():
        names = list(dict.fromkeys(e.rsplit(".", 1)[-1] for e in spec
                                   if f"{module}.{e.rsplit('.', 1)[-1]}" == e
                                   or f"{module}.{e.rsplit('.', 1)[-1]}".endswith("." + e)))
        if len(names) != len(stems) or sorted(stems) != list(range(len(stems))) or len(names) > 6:
            continue
        fits = [order for order in permutations(names) if _one_expert_count(config, module, order, stems, rows)]
        for depth, stem in stems.items():
            if not fits:
                break
            found = {order[len(stems) - 1 - depth] for order in fits}  # order is innermost first: depth 0 is last
            key = f"{module}.{fits[0][len(stems) - 1 - depth]}"
            r = config.rank_for(key)
            out[stem] = Stack(found.pop() if len(found) == 1 else None, r, rows[stem] // r, config.scaling(key))
    return out


def _one_expert_count(config: LoraConfig, module: str, order: tuple[str, ...], stems: dict[int, str],
                      rows: dict[str, int]) -> bool:
    counts = set()
    for depth, stem in stems.items():
        r = config.rank_for(f"{module}.{order[len(stems) - 1 - depth]}")
        if rows[stem] % r:
            return False
        counts.add(rows[stem] // r)
    return len(counts) == 1


def stacked_ranks(config: LoraConfig, tensors: dict[str, Tensor], weights_file: Path) -> set[str]:
    """Core's ``TENSOR_CHECKS`` entry: with ``target_parameters``, the ``lora_A`` keys that are expert stacks
    (``E*r`` rows): those :func:`parameter_stacks` resolves (each parameter at its own rank, ``rank_pattern``
    by parameter path) and any whose rows are a multiple of the config's rank for its module. Their rows are
    checked against the model at load (:func:`check_ranks`)."""
    if config.target_parameters is None:
        return set()
    stems = {k: k.rsplit(".lora_", 1)[0].removeprefix(PREFIX) for k in tensors
             if k.endswith(".lora_A.weight") and tensors[k].dim() >= 1}
    stacks = parameter_stacks(config, {stem: tensors[k].shape[0] for k, stem in stems.items()})
    return {k for k, stem in stems.items() if stem in stacks or tensors[k].shape[0] % config.rank_for(stem) == 0}


def peft_names(model: nn.Module, config: LoraConfig, held: list[tuple[str, LoraLayer]], peft: dict) -> set[str]:
    """Core's ``PEFT_TARGETS`` entry: PEFT's ``target_parameters`` for the adapted parameters, written into
    ``peft``: ``<module leaf>.<parameter>`` names when they select exactly those (``"experts.gate_up_proj"``),
    else full paths (``"all-experts"`` is lorakit's). Returns the paths of the parameter layers."""
    owned = {p: m.parameter_names for p, m in held if isinstance(m, tuple(PARAMETER_LAYERS.values()))}
    if not owned:
        return set()
    keys = [f"{p}.{n}" for p, names in owned.items() for n in names]
    leaves = sorted({".".join(k.split(".")[-2:]) for k in keys})
    try:
        same = find_parameter_targets(model, config.replace(target_parameters=leaves)) == owned
    except ValueError:
        same = False
    peft["target_parameters"] = leaves if same else keys
    return set(owned)


def register() -> None:
    """Plug ``target_parameters`` into core's tables (before trainable tokens, which see its layers); calling it
    again changes nothing."""
    for table, entry in ((CONFIG_CHECKS, check_config), (EXTRA_LAYERS, plan_parameters), (LOAD_CHECKS, check_ranks),
                         (TENSOR_CHECKS, stacked_ranks), (PEFT_TARGETS, peft_names)):
        if entry not in table:
            table.append(entry)
