"""LoRA over a whole model: add, freeze, switch, merge, unload.

Every function takes an ordinary ``nn.Module`` and changes it in place; there is no wrapper model.
The adapter name is the only handle: each wrapped layer keeps its adapters in one ``ModuleDict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraConfig, check_scaling, module_matches
from .layers import Adapter, LoraLayer, changed_base, lora_layer_type
from .saved import SavedModule
from .tables import EXTRA_LAYERS, INITIALIZERS, ON_ATTACH, parse_init
from .targets import find_modules_to_save, find_targets, outside_adapters


# ----- injection -----------------------------------------------------------------------------------------
@dataclass
class Planned:
    path: str
    layer: LoraLayer  # an existing wrapper, or a new one not yet placed in the model
    adapter: Adapter
    new_layer: bool


def plan_adapter(model: nn.Module, config: LoraConfig, name: str) -> tuple[list[Planned], dict[str, nn.Module]]:
    """Build adapter ``name`` for ``model`` without touching the model.

    Returns the planned layers and the new ``modules_to_save`` copies (path -> module). Nothing is
    attached until :func:`commit_adapter`, so a caller can fill and validate weights first. Every check
    that :func:`commit_adapter` would need is made here.
    """
    check_new_adapter(model, name, config)
    planned = []
    for path in find_targets(model, config) if config.target_modules != [] else []:
        module = model.get_submodule(path)
        new_layer = not isinstance(module, LoraLayer)
        layer = lora_layer_type(module)(module) if new_layer else module
        adapter = layer.new_adapter(config, path)
        check_scaling(config, adapter.dtype, path)  # a scaling over fp16's max overflows in every forward
        planned.append(Planned(path, layer, adapter, new_layer))
    for extra in EXTRA_LAYERS:  # layers besides the target_modules (parameters, trainable tokens)
        planned += [Planned(*entry) for entry in extra(model, config, name, [p.path for p in planned])]
    if not planned:
        raise ValueError("the config adapts nothing: target_modules=[] needs trainable_token_indices or "
                         "target_parameters")
    stray = [key for key in config.slices if not any(module_matches(p.path, key) for p in planned)]
    if stray:  # a typo would otherwise adapt every slice of the fused projection
        raise ValueError(f"slices {stray} match no adapted module; targets: {[p.path for p in planned][:4]}"
                         f"{' ...' if len(planned) > 4 else ''}")
    copies = {}
    if config.modules_to_save:
        paths = find_modules_to_save(model, config.modules_to_save)
        if not paths:
            raise ValueError(f"modules_to_save={config.modules_to_save} matches no module of this model")
        for saved in paths:
            inside = [p.path for p in planned if p.path == saved or p.path.startswith(saved + ".")]
            if inside:
                raise ValueError(f"modules_to_save {saved!r} contains the LoRA target {inside[0]!r}: a module is "
                                 "either adapted or trained in full, not both")
            held = [p for p, m in outside_adapters(model) if isinstance(m, LoraLayer) and (p + ".").startswith(saved + ".")]
            if held:  # its copies would hold copies of those layers, which whole-model queries do not enter
                raise ValueError(f"modules_to_save {saved!r} contains {held[0]!r}, which adapter(s) "
                                 f"{list(model.get_submodule(held[0]).adapters)} adapt: a module is either adapted or "
                                 "trained in full, not both")
        for path in paths:
            module = model.get_submodule(path)
            original = module.original if isinstance(module, SavedModule) else module
            copies[path] = SavedModule(original).add_copy(name)
    return planned, copies


def check_new_adapter(model: nn.Module, name: str, config: LoraConfig) -> None:
    """What every new adapter (added, loaded or combined) must satisfy; raises before anything changes."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    existing = adapter_names(model)
    if name in existing:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    _check_no_context(model, f"add adapter {name!r}")
    merged = merged_names(model)
    if merged:
        raise RuntimeError(f"adapter {merged} is merged into the weights; unmerge(model) before adding {name!r}")
    # The base biases are shared by every adapter: an adapter that trains them would change the others'
    # outputs, and every checkpoint would hold them (PEFT refuses this too).
    bias_of = {n: a.config.bias for layer in lora_layers(model) for n, a in layer.adapters.items()}  # has every name of existing
    with_bias = [a for a in existing if bias_of[a] != "none"]
    if existing and (config.bias != "none" or with_bias):
        owner = f"adapter {with_bias[0]!r} has bias={bias_of[with_bias[0]]!r}" if with_bias \
            else f"bias={config.bias!r}"
        raise ValueError(f"{owner}, but only a model's single adapter may train the (shared) base biases; "
                         "use bias='none' for every adapter when there are several")
    check_base_kept(model, f"adding adapter {name!r}", config)  # PiSSA & co. replace shared base weights


def commit_adapter(model: nn.Module, name: str, planned: list[Planned], copies: dict[str, nn.Module],
                   activate: bool = True) -> None:
    """Attach a planned adapter (``activate``: make it active and the one that trains).

    New modules take the train/eval mode of the module they sit beside, so an adapter loaded into a
    model in eval mode runs without dropout.
    """
    for p in planned:
        mode = p.layer.base_layer.training
        if p.new_layer:
            _follow_mode(p.layer, p.layer.base_layer)
            _set_submodule(model, p.path, p.layer)
        p.layer.attach(name, p.adapter.train(mode))
    for path, module in copies.items():
        holder = model.get_submodule(path)
        if not isinstance(holder, SavedModule):
            holder = SavedModule(holder)
            _follow_mode(holder, holder.original)
            _set_submodule(model, path, holder)
        holder.copies[name] = module.train(holder.original.training)
    if activate:
        set_adapter(model, name)
    for hook in ON_ATTACH:  # save_pretrained refused (lorakit.save_guard); 4-bit layers get a layout with a backward
        hook(model)


def _follow_mode(wrapper: nn.Module, inner: nn.Module) -> None:
    """A new wrapper (and its containers) takes the train/eval mode of the module it wraps."""
    wrapper.training = inner.training
    for child in wrapper.children():
        if child is not inner:
            child.train(inner.training)


def add_lora(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Wrap the layers ``config`` selects with a new adapter, make it active, freeze the rest.

    Trainable afterwards: this adapter's A and B, the biases ``config.bias`` names and the copies of
    ``config.modules_to_save``. Returns ``model`` itself (changed in place). Only one adapter of a model
    may train biases (``bias`` other than ``"none"``): the base biases are shared by all adapters.
    """
    planned, copies = plan_adapter(model, config, adapter)
    commit_adapter(model, adapter, planned, copies)
    return model


def _set_trainable(model: nn.Module, name: str | None) -> None:
    """Only adapter ``name``, the biases its ``config.bias`` names and its modules_to_save copies train."""
    config = adapter_config(model, name) if name is not None else None
    bias = config.bias if config is not None else "none"
    modules = [m for _, m in outside_adapters(model)]  # the adapters and copies are set below, each once
    for module in modules:
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
    if bias == "all":
        for module in modules:
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                module.bias.requires_grad_(True)
    for module in modules:
        held = module.adapters if isinstance(module, LoraLayer) else \
            module.copies if isinstance(module, SavedModule) else {}
        for key, adapter in held.items():
            _set_requires_grad(adapter, key == name)
        if bias == "lora_only" and isinstance(module, LoraLayer) and name in held \
                and isinstance(getattr(module.base_layer, "bias", None), nn.Parameter):
            module.base_layer.bias.requires_grad_(True)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    """``module.requires_grad_(flag)`` without ``named_modules``' generators, which cost more than the flags
    when :func:`_set_trainable` visits every adapter of every layer (leaf children, A and B, read inline)."""
    for p in module._parameters.values():
        if p is not None and p.requires_grad != flag:
            p.requires_grad_(flag)
    for child in module._modules.values():
        if child is None:
            continue
        if child._modules:
            _set_requires_grad(child, flag)
            continue
        for p in child._parameters.values():
            if p is not None and p.requires_grad != flag:
                p.requires_grad_(flag)


def _check_no_context(model: nn.Module, action: str) -> None:
    """Changing adapters or weights inside ``disabled()`` / ``per_row_adapters()`` would run stale plans
    (new layers outside the context, merged weights under a per-row update): refused."""
    layers, saved = wrappers(model)
    if any(obj.disabled for obj in layers + saved):
        raise RuntimeError(f"cannot {action} inside disabled(); leave the context first")
    if any(layer.row_plan is not None for layer in layers) or any(m.row_names is not None for m in saved):
        raise RuntimeError(f"cannot {action} inside per_row_adapters(); leave the context first")


def merged_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for layer in lora_layers(model) for n in layer.merged))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


# ----- queries ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> Iterator[LoraLayer]:
    return (m for _, m in outside_adapters(model) if isinstance(m, LoraLayer))


def holding(model: nn.Module, adapter: str) -> list[tuple[str, LoraLayer]]:
    """(path, layer) of the LoRA layers that hold ``adapter``, in model order."""
    return [(p, m) for p, m in outside_adapters(model) if isinstance(m, LoraLayer) and adapter in m.adapters]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    for layer in lora_layers(model):
        if layer.active is not None:
            return layer.active
    return None


def adapter_config(model: nn.Module, adapter: str = "default") -> LoraConfig:
    for layer in lora_layers(model):
        if adapter in layer.adapters:
            return layer.adapters[adapter].config
    raise _unknown(model, adapter)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once, a packed 4-bit weight as the
    weights it holds."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(weight_count(p) for p in seen.values() if p.requires_grad)
    return trainable, sum(weight_count(p) for p in seen.values())


def weight_count(p: torch.Tensor) -> int:
    """How many weights a parameter holds: a packed 4-bit one (bitsandbytes' ``quant_state``) holds two or more
    per stored element."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None and not p.dtype.is_floating_point else p.numel()


def _unknown(model: nn.Module, adapter: str) -> KeyError:
    return KeyError(f"no adapter named {adapter!r}; the model has {adapter_names(model)}")


# ----- switching -------------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter every layer runs and the one that trains (``None``: the base model).

    As in PEFT, switching moves ``requires_grad``: afterwards exactly what :func:`add_lora` would leave
    trainable for ``name`` trains (its A and B, the biases its ``bias`` names, its ``modules_to_save``
    copies); every other parameter is frozen. With ``None`` nothing trains.
    """
    layers, saved = wrappers(model)
    if name is not None and not any(name in layer.adapters for layer in layers):
        raise _unknown(model, name)
    if name is None:
        check_base_kept(model, "set_adapter(model, None)")
    merged = merged_names(model)
    if merged and name not in merged:
        raise RuntimeError(f"adapter {merged} is merged; unmerge(model) before switching to {name!r}")
    for layer in layers:
        layer.active = name if name in layer.adapters else None
    for m in saved:
        m.active = name
    _set_trainable(model, name)


def wrappers(model: nn.Module) -> tuple[list[LoraLayer], list[SavedModule]]:
    """The LoRA layers and ``modules_to_save`` holders of ``model``, in one pass over its modules."""
    layers, saved = [], []
    for _, m in outside_adapters(model):
        if isinstance(m, LoraLayer):
            layers.append(m)
        elif isinstance(m, SavedModule):
            saved.append(m)
    return layers, saved


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left without adapters go back to their base layer.

    Deleting the active adapter activates the first remaining one (in the order they were added) with a
    warning, as PEFT does, rather than silently running the base model; with none left, no adapter is active.
    """
    names = adapter_names(model)
    if name not in names:
        raise _unknown(model, name)
    if name in merged_names(model):
        raise RuntimeError(f"adapter {name!r} is merged; unmerge(model) first")
    _check_no_context(model, f"delete adapter {name!r}")
    was_active = active_adapter(model) == name
    for path, module in list(outside_adapters(model)):
        if isinstance(module, LoraLayer):
            held, original = module.adapters, module.base_layer
        elif isinstance(module, SavedModule):
            held, original = module.copies, module.original
        else:
            continue
        if name not in held:
            continue
        if isinstance(module, LoraLayer):
            module.release(name)  # restores a base weight the adapter's initialiser replaced
        else:
            del held[name]
        if module.active == name:
            module.active = None
        if not len(held):  # the last adapter gone: the original module goes back in place
            _set_submodule(model, path, original)
    remaining = [n for n in names if n != name]
    if was_active and remaining:
        merged = merged_names(model)
        new = next((n for n in remaining if n in merged), remaining[0])  # a merged adapter must stay active
        warnings.warn(f"deleted the active adapter {name!r}; {new!r} is active now", UserWarning, stacklevel=2)
        set_adapter(model, new)


@contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Run with adapter ``name`` active; the previous choice (and what trains) is restored on exit."""
    layers, saved = wrappers(model)
    with _restoring("active", layers + saved, list(model.parameters())):
        set_adapter(model, name)
        yield model


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: every adapter and ``modules_to_save`` copy is bypassed, also inside
    :func:`per_row_adapters` (disabling wins).

    As in PEFT, the adapters' parameters stop requiring grad inside the context (restored on exit).
    Biases trained with ``bias="all"``/``"lora_only"`` are the base layers' own and stay in effect:
    then the output is not the original base model's, and a warning says so.
    """
    layers, saved = wrappers(model)
    if merged := merged_names(model):
        raise RuntimeError(f"adapter {merged} is merged into the weights; unmerge(model) first")
    check_base_kept(model, "disabled(model)")
    for a in adapter_names(model):
        if (bias := adapter_config(model, a).bias) != "none":
            warnings.warn(f"adapter {a!r} trained the base biases (bias={bias!r}); disabled() keeps them, so the "
                          "output is not the original base model's", UserWarning, stacklevel=3)
    params = [p for obj in layers for p in obj.adapters.parameters()] + [p for m in saved for p in m.copies.parameters()]
    with _restoring("disabled", layers + saved, params):  # nested contexts restore the outer state
        for obj in layers + saved:
            obj.disabled = True
        for p in params:
            p.requires_grad_(False)
        yield model


@contextmanager
def _restoring(attr: str, objs: list[nn.Module], params: list[nn.Parameter]):
    """On exit, ``attr`` of each of ``objs`` and ``requires_grad`` of each of ``params`` are as on entry."""
    before = [(obj, getattr(obj, attr)) for obj in objs]
    flags = [(p, p.requires_grad) for p in params]
    try:
        yield
    finally:
        for obj, value in before:
            setattr(obj, attr, value)
        for p, flag in flags:
            p.requires_grad_(flag)


# ----- merge -------------------------------------------------------------------------------------------
def merge(model: nn.Module, adapter: str | None = None, safe: bool = True) -> None:
    """Add ``adapter``'s update (default: the active one) into the base weights.

    The merged model gives the unmerged output with no added latency; :func:`unmerge` undoes it.
    ``safe=True`` (the default; PEFT's ``safe_merge`` defaults to off) first checks that every merged
    weight is finite in the model's dtype and changes nothing if one is not; ``safe=False`` skips that
    pass (half the work).
    """
    name = adapter if adapter is not None else active_adapter(model)
    if name is None:
        raise ValueError("no active adapter to merge; pass adapter=")
    if name not in adapter_names(model):
        raise _unknown(model, name)
    _check_no_context(model, "merge")
    layers = [layer for layer in lora_layers(model) if name in layer.adapters and name not in layer.merged]
    if safe:
        _check_finite_merge(model, layers, name)
    for layer in layers:
        layer.merge(name)


def _check_finite_merge(model: nn.Module, layers: list[LoraLayer], name: str) -> None:
    """Raise if merging ``name`` into any of ``layers`` gives a non-finite weight (after the cast)."""
    for layer in layers:
        if not torch.isfinite(layer.merged_weight(name)).all():
            path = next(p for p, m in model.named_modules() if m is layer)
            raise ValueError(f"merging adapter {name!r} gives non-finite weights in {path} "
                             f"({layer.base_layer.weight.dtype}); nothing was changed")


def unmerge(model: nn.Module) -> None:
    """Subtract every merged update: the base weights come back (fp32: to rounding, ~1e-7 relative)."""
    for layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove lorakit from ``model``: every wrapper is replaced by its base layer (original types).

    ``merge=True`` first merges the active adapter and keeps the active ``modules_to_save`` copies;
    ``merge=False`` gives the base model back (merged updates are subtracted, originals restored).
    A merge whose weights would not be finite in the model's dtype is refused with the model unchanged.
    """
    _check_no_context(model, "unload")
    name = active_adapter(model)
    if merge:  # validate first: a non-finite merged weight is refused with the model unchanged
        _check_finite_merge(model, [m for m in lora_layers(model) if name in m.adapters and name not in m.merged],
                            name)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge and name in module.adapters and name not in module.merged:
                module.merge(name)
            elif not merge:
                module.unmerge()
            for held in [n for n in module.adapters if n not in module.merged]:
                module.release(held)  # a base weight replaced by an initialiser (PiSSA...) comes back
            _set_submodule(model, path, module.base_layer)
        elif isinstance(module, SavedModule):
            keep = module.copies[name] if merge and name in module.copies else module.original
            _set_submodule(model, path, keep)
    return model


# ----- base weights an initialiser replaced (PiSSA, OLoRA...) ---------------------------------------------
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
        init = adapter_config(model, owner).init
        raise ValueError(f"{doing}: adapter {owner!r} replaced the base weights (init {init!r}), so only it can "
                         f"run on this model; delete_adapter(model, {owner!r}) restores them, "
                         "save_adapter(..., convert_to_lora=True) writes it as a plain LoRA for the original base")
    if config is not None and INITIALIZERS[parse_init(config.init)[0]].changes_base:
        names = sorted({n for m in modules if isinstance(m, LoraLayer) for n in m.adapters})
        if names:
            raise ValueError(f"init {config.init!r} replaces base weights, which adapters {names} of this model "
                             "use; add it to a model without adapters")
