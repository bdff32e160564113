"""LoRA over a whole model: add, freeze, switch, merge, unload, combine, per-row adapters.

Every function takes an ordinary ``nn.Module`` and changes it in place; there is no wrapper model.
The adapter name is the only handle: each wrapped layer keeps its adapters in one ``ModuleDict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.per_row import make_row_update
from .config import LoraConfig
from .layers import Adapter, LoraLayer, lora_layer_type
from .quantized import weight_count
from .saved import SavedModule
from .targets import find_modules_to_save, find_targets
from .variants import check_base_kept, check_rows


# ----- injection -----------------------------------------------------------------------------------------
@dataclass
class _Planned:
    path: str
    layer: LoraLayer  # an existing wrapper, or a new one not yet placed in the model
    adapter: Adapter
    new_layer: bool


def plan_adapter(model: nn.Module, config: LoraConfig, name: str) -> tuple[list[_Planned], dict[str, nn.Module]]:
    """Build adapter ``name`` for ``model`` without touching the model.

    Returns the planned layers and the new ``modules_to_save`` copies (path -> module). Nothing is
    attached until :func:`commit_adapter`, so a caller can fill and validate weights first.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    check_base_kept(model, f"adding adapter {name!r}", config)
    planned = []
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        new_layer = not isinstance(module, LoraLayer)
        layer = lora_layer_type(module)(module) if new_layer else module
        planned.append(_Planned(path, layer, layer.new_adapter(config, path), new_layer))
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
        for path in paths:
            module = model.get_submodule(path)
            original = module.original if isinstance(module, SavedModule) else module
            copies[path] = SavedModule(original).add_copy(name)
    return planned, copies


def commit_adapter(model: nn.Module, name: str, planned: list[_Planned], copies: dict[str, nn.Module]) -> None:
    """Attach a planned adapter, make it active and set which parameters train."""
    for p in planned:
        if p.new_layer:
            _set_submodule(model, p.path, p.layer)
        p.layer.attach(name, p.adapter)
    for path, module in copies.items():
        holder = model.get_submodule(path)
        if not isinstance(holder, SavedModule):
            holder = SavedModule(holder)
            _set_submodule(model, path, holder)
        holder.copies[name] = module
    config = planned[0].adapter.config
    set_adapter(model, name)
    _freeze_base(model, config, name)


def add_lora(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Wrap the layers ``config`` selects with a new adapter, make it active, freeze the rest.

    Trainable afterwards: this adapter's A and B, the biases ``config.bias`` names and the copies of
    ``config.modules_to_save``. Returns ``model`` itself (changed in place).
    """
    planned, copies = plan_adapter(model, config, adapter)
    commit_adapter(model, adapter, planned, copies)
    return model


def _freeze_base(model: nn.Module, config: LoraConfig, name: str) -> None:
    """Only adapter ``name``, the biases ``config.bias`` names and its modules_to_save copies train."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config.bias == "all":
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                module.bias.requires_grad_(True)
    for layer in lora_layers(model):
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(True)
            if config.bias == "lora_only" and isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                layer.base_layer.bias.requires_grad_(True)
    for saved in _saved_modules(model):
        saved.original.requires_grad_(False)
        if name in saved.copies:
            saved.copies[name].requires_grad_(True)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


# ----- queries ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> Iterator[LoraLayer]:
    return (m for m in model.modules() if isinstance(m, LoraLayer))


def _saved_modules(model: nn.Module) -> Iterator[SavedModule]:
    return (m for m in model.modules() if isinstance(m, SavedModule))


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


def _unknown(model: nn.Module, adapter: str) -> KeyError:
    return KeyError(f"no adapter named {adapter!r}; the model has {adapter_names(model)}")


# ----- switching -------------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter every layer runs (``None``: no adapter, the base model)."""
    layers, saved = _wrappers(model)
    if name is not None and not any(name in layer.adapters for layer in layers):
        raise _unknown(model, name)
    if name is None:
        check_base_kept(model, "set_adapter(model, None)")
    for layer in layers:
        if layer.merged and name not in layer.merged:
            raise RuntimeError(f"adapter {layer.merged} is merged; unmerge(model) before switching to {name!r}")
        layer.active = name if name in layer.adapters else None
    for m in saved:
        m.active = name


def _wrappers(model: nn.Module) -> tuple[list[LoraLayer], list[SavedModule]]:
    """The LoRA layers and ``modules_to_save`` holders of ``model``, in one pass over its modules."""
    layers, saved = [], []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            layers.append(m)
        elif isinstance(m, SavedModule):
            saved.append(m)
    return layers, saved


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left without adapters go back to their base layer."""
    if name not in adapter_names(model):
        raise _unknown(model, name)
    for layer in list(lora_layers(model)):
        if name in layer.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge(model) first")
    for path, module in list(model.named_modules()):
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


@contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Run with adapter ``name`` active; the previous choice is restored on exit."""
    layers, saved = _wrappers(model)
    before = [(obj, obj.active) for obj in layers + saved]
    set_adapter(model, name)
    try:
        yield model
    finally:
        for obj, active in before:
            obj.active = active


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: every adapter and ``modules_to_save`` copy is bypassed."""
    layers, saved = _wrappers(model)
    for layer in layers:
        if layer.merged:
            raise RuntimeError(f"adapter {layer.merged} is merged into the weights; unmerge(model) first")
    check_base_kept(model, "disabled(model)")
    for obj in layers + saved:
        obj.disabled = True
    try:
        yield model
    finally:
        for obj in layers + saved:
            obj.disabled = False


@contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None]):
    """Row ``i`` of the batch runs adapter ``names[i]`` (``None``: the base model), in one forward.

    Linear-like and embedding layers use stacked adapter weights gathered per row (one batched matmul
    pair per layer whatever the number of adapters); dropout is not applied.
    """
    names = list(names)
    known = set(adapter_names(model))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise KeyError(f"per_row_adapters: no adapter named {unknown}; the model has {sorted(known)}")
    layers, saved = _wrappers(model)
    if any(layer.merged for layer in layers):
        raise RuntimeError("per_row_adapters needs unmerged adapters; unmerge(model) first")
    check_rows(model, layers, names)
    for layer in layers:
        layer.row_plan = make_row_update(layer, names)
    for m in saved:
        m.row_names = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_plan = None
        for m in saved:
            m.row_names = None


# ----- merge -------------------------------------------------------------------------------------------
def merge(model: nn.Module, adapter: str | None = None, safe: bool = False) -> None:
    """Add ``adapter``'s update (default: the active one) into the base weights.

    The merged model gives the unmerged output with no added latency; :func:`unmerge` undoes it.
    ``safe=True`` first checks every merged weight is finite and changes nothing if one is not.
    """
    name = adapter if adapter is not None else active_adapter(model)
    if name is None:
        raise ValueError("no active adapter to merge; pass adapter=")
    if name not in adapter_names(model):
        raise _unknown(model, name)
    layers = [layer for layer in lora_layers(model) if name in layer.adapters and name not in layer.merged]
    if safe:
        for layer in layers:
            merged = layer.merged_weight(name)
            if not torch.isfinite(merged).all():
                path = next(p for p, m in model.named_modules() if m is layer)
                raise ValueError(f"merging adapter {name!r} gives non-finite weights in {path}; nothing was changed")
    for layer in layers:
        layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged update: the base weights come back (fp32: to rounding, ~1e-7 relative)."""
    for layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove lorakit from ``model``: every wrapper is replaced by its base layer (original types).

    ``merge=True`` first merges the active adapter and keeps the active ``modules_to_save`` copies;
    ``merge=False`` gives the base model back (merged updates are subtracted, originals restored).
    """
    name = active_adapter(model)
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


# ----- combining -----------------------------------------------------------------------------------------
def combine_adapters(model: nn.Module, weights: dict[str, float], name: str, how: str = "linear",
                     rank: int | None = None) -> None:
    """Add adapter ``name`` built from existing adapters with per-adapter ``weights``.

    With ``s_i`` each adapter's scaling and ``w_i`` its weight (the new adapter has scaling 1):

    - ``"cat"``:    A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (rank = sum of ranks), so
      ``B A = sum_i w_i s_i B_i A_i`` exactly.
    - ``"linear"``: A = sum_i c_i A_i, B = sum_i sign(w_i) c_i B_i with ``c_i = sqrt(|w_i| s_i)`` (equal
      ranks; PEFT's "linear": cross terms make it an approximation of the weighted sum).
    - ``"svd"``:    the best rank-``rank`` approximation (truncated SVD) of ``sum_i w_i s_i B_i A_i``;
      ``rank`` defaults to the largest input rank; exact when it covers the sum of ranks.
    """
    if how not in ("linear", "cat", "svd"):
        raise ValueError(f"how must be linear|cat|svd, got {how!r}")
    if not weights:
        raise ValueError("combine_adapters needs at least one adapter weight")
    for a in weights:
        if a not in adapter_names(model):
            raise _unknown(model, a)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists")
    check_base_kept(model, "combine_adapters")
    for layer in lora_layers(model):
        for a in weights:
            if a in layer.adapters and not layer.adapters[a].additive:
                raise ValueError(f"combine_adapters: adapter {a!r} is a {type(layer.adapters[a]).__name__}, "
                                 "not a plain B·A update; only plain LoRA adapters combine")
    configs = [adapter_config(model, a) for a in weights]
    for layer in lora_layers(model):
        parts = [(layer.adapters[a], w) for a, w in weights.items() if a in layer.adapters]
        if not parts:
            continue
        A, B = _combined_pair(parts, how, rank)
        path = next(p for p, m in model.named_modules() if m is layer)
        config = configs[0].replace(r=A.shape[0], alpha=float(A.shape[0]), use_rslora=False, slices={},
                                    rank_pattern={}, alpha_pattern={})
        adapter = layer.make_adapter(A.shape[0], 1.0, config, path)
        adapter.load_pair(A, B)
        adapter.requires_grad_(False)
        layer.adapters[name] = adapter


def _combined_pair(parts: list[tuple[Adapter, float]], how: str, rank: int | None):
    pairs = [(a.plain_pair(), a.scaling, w) for a, w in parts]
    with torch.no_grad():
        if how == "cat":
            A = torch.cat([A.float() for (A, _), _, _ in pairs])
            B = torch.cat([B.float() * s * w for (_, B), s, w in pairs], dim=1)
        elif how == "linear":
            ranks = {A.shape[0] for (A, _), _, _ in pairs}
            if len(ranks) > 1:
                raise ValueError(f"how='linear' needs adapters of equal rank, got ranks {sorted(ranks)}; use 'cat' or 'svd'")
            A = sum((abs(w) * s) ** 0.5 * A.float() for (A, _), s, w in pairs)
            B = sum((1 if w >= 0 else -1) * (abs(w) * s) ** 0.5 * B.float() for (_, B), s, w in pairs)
        else:
            delta = sum(w * s * (B.float() @ A.float()) for (A, B), s, w in pairs)
            k = rank or max(A.shape[0] for (A, _), _, _ in pairs)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            A, B = Vh[:k], U[:, :k] * S[:k]
    return A, B
