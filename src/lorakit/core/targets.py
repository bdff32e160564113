"""Which modules of a model to adapt: names, regex, ``all-linear``, block indices, exclusions."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .layers import LoraLayer, LoraLinear, is_linear_like, lora_layer_type
from .saved import SavedModule

# The paper's choice (query and value projections) for common transformers architectures.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt_neox": ["query_key_value"],
    "t5": ["q", "v"],
}


def outside_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of ``model`` and its submodules in ``named_modules`` order, without entering any adapter
    (``LoraLayer.adapters``) or ``modules_to_save`` copy (``SavedModule.copies``).

    What whole-model queries (which layers are wrapped, which adapter is active...) need, at a cost that does
    not grow with the number of adapters: ``model.modules()`` visits every adapter's submodules, which made
    adding the n-th adapter cost O(n) walks of O(n) modules each.
    """
    stack, seen = [("", model)], set()
    while stack:
        path, module = stack.pop()
        if id(module) in seen:  # a module reachable twice is listed once, as named_modules does
            continue
        seen.add(id(module))
        yield path, module
        per_adapter = module.adapters if isinstance(module, LoraLayer) else \
            module.copies if isinstance(module, SavedModule) else None
        children = [(f"{path}.{name}" if path else name, child) for name, child in module._modules.items()
                    if child is not None and child is not per_adapter]
        stack.extend(reversed(children))


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module a LoRA layer can wrap, or already wraps; never inside a wrapper."""
    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, LoraLayer):
                yield path, child
            elif isinstance(child, SavedModule):
                continue
            else:
                if lora_layer_type(child) is not None:
                    yield path, child
                yield from walk(child, path)

    yield from walk(model, "")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LoraLinear) or is_linear_like(module)


def _output_head_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def block_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    if layers_pattern:
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        alternatives = "|".join(re.escape(n) for n in names)
        m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", path)
    else:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def selected(path: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == key or path.endswith("." + key) for key in spec)


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """``config.target_modules``, or the default for the model's transformers architecture."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(
        f"target_modules is not set and there is no default for model_type={model_type!r}; "
        f"pass target_modules (e.g. 'all-linear'). Linear-like modules: {describe_linear_modules(model)}"
    )


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts, in model order. Raises ValueError if there are none (unless
    ``config`` adapts parameters only: ``target_parameters`` without ``target_modules``)."""
    if config.target_modules is None and config.target_parameters is not None:
        return []
    spec = resolve_target_modules(model, config)
    heads = _output_head_names(model) if spec == "all-linear" else set()
    found, excluded = [], []
    for path, module in adaptable_modules(model):
        if spec == "all-linear":
            if not _is_linear(module) or path in heads or path.split(".")[-1] in heads:
                continue
        elif not selected(path, spec):
            continue
        if config.exclude_modules is not None and selected(path, config.exclude_modules):
            excluded.append(path)
            continue
        if config.layers is not None and block_index(path, config.layers_pattern) not in config.layers:
            continue
        found.append(path)
    if isinstance(spec, list):
        _check_listed_names(model, spec)
    if not found and excluded and config.layers is None:
        raise ValueError(f"exclude_modules={config.exclude_modules!r} removes every module target_modules={spec!r} "
                         f"matches ({len(excluded)}: {', '.join(excluded[:3])}{', ...' if len(excluded) > 3 else ''})")
    if not found:
        raise ValueError(
            f"no module matches target_modules={spec!r}"
            + (f" with layers={config.layers}" if config.layers is not None else "")
            + f". Linear-like modules of this model: {describe_linear_modules(model)}"
        )
    return found


def _check_listed_names(model: nn.Module, spec: list[str]) -> None:
    """A listed name that matches modules, none of them adaptable, is an error naming it (PEFT-like lists
    may name modules a model lacks: those pass)."""
    adaptable = [path for path, _ in adaptable_modules(model)]
    modules = list(outside_adapters(model))
    wrapped = [p for p, m in modules if isinstance(m, LoraLayer | SavedModule)]
    for key in spec:
        if any(selected(path, [key]) for path in adaptable):
            continue
        others = [(p, m) for p, m in modules
                  if p and selected(p, [key]) and not any(p.startswith(w + ".") for w in wrapped)]
        if any(isinstance(m, SavedModule) for _, m in others):
            raise ValueError(f"target_modules entry {key!r} names a module another adapter trains in full "
                             "(modules_to_save); a module is either adapted or trained in full, not both")
        if others:
            kinds = sorted({type(m).__name__ for _, m in others})
            raise ValueError(f"target_modules entry {key!r} matches only modules lorakit cannot adapt "
                             f"({', '.join(kinds)}: {others[0][0]!r}); adaptable types are Linear, Embedding, "
                             "Conv1d/2d/3d and GPT-2's Conv1D")


def describe_linear_modules(model: nn.Module, limit: int = 12) -> str:
    """Short listing of linear-like module names: distinct last components, then a few full paths."""
    paths = [p for p, m in adaptable_modules(model) if _is_linear(m)]
    if not paths:
        return "(none)"
    leaves = list(dict.fromkeys(p.split(".")[-1] for p in paths))
    sample = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"names {leaves[:limit]}{' ...' if len(leaves) > limit else ''} ({len(paths)} in all, e.g. {sample})"


def find_modules_to_save(model: nn.Module, keys: list[str]) -> list[str]:
    """Paths of the modules named by ``modules_to_save`` (exact path or suffix), outermost only."""
    found: list[str] = []
    for path, _ in outside_adapters(model):  # parents come before their children
        if path and not any(path.startswith(p + ".") for p in found) and selected(path, keys):
            found.append(path)
    return found
