"""Several adapters combined into a new one (PEFT's ``add_weighted_adapter``): ``combine_adapters``."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..core.layers import Adapter, LoraLayer
from ..core.model import (
    Planned,
    adapter_config,
    adapter_names,
    check_new_adapter,
    commit_adapter,
    lora_layers,
)
from ..core.saved import SavedModule
from ..core.targets import outside_adapters


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

    Everything is computed and checked before the model changes. A ``modules_to_save`` copy trained by
    one of the adapters goes with the new adapter; two adapters that both train the same module cannot
    be combined (a full module has no weighted sum), as in PEFT. The new adapter is not activated.
    """
    _check_inputs(model, weights, how, rank)
    configs = [adapter_config(model, a) for a in weights]
    keep = list(dict.fromkeys(k for c in configs for k in c.modules_to_save or []))
    config = configs[0].replace(use_rslora=False, slices={}, rank_pattern={}, alpha_pattern={}, bias="none",
                                modules_to_save=keep or None, use_dora=False, init="kaiming")
    check_new_adapter(model, name, config)
    planned = []
    for path, layer in outside_adapters(model):
        if not isinstance(layer, LoraLayer):
            continue
        parts = [(layer.adapters[a], w) for a, w in weights.items() if a in layer.adapters]
        if not parts:
            continue
        try:
            A, B = _combined_pair(parts, how, rank)
        except ValueError as e:
            raise ValueError(f"combine_adapters at {path}: {e}") from None
        adapter = layer.make_adapter(A.shape[0], 1.0, config.replace(r=A.shape[0], alpha=float(A.shape[0])), path)
        adapter.load_pair(A, B)
        if not all(torch.isfinite(p).all() for p in adapter.parameters()):  # in the adapter's dtype
            raise ValueError(f"combine_adapters: the combined adapter is not finite at {path} ({adapter.dtype})")
        planned.append(Planned(path, layer, adapter, new_layer=False))
    copies = {}
    for path, saved in outside_adapters(model):
        if isinstance(saved, SavedModule):
            owners = [a for a in weights if a in saved.copies]
            if len(owners) > 1:
                raise ValueError(f"combine_adapters: adapters {owners} both train modules_to_save {path!r}; "
                                 "a fully trained module cannot be combined")
            if owners:
                copies[path] = copy.deepcopy(saved.copies[owners[0]])
    commit_adapter(model, name, planned, copies, activate=False)
    for p in planned:
        p.adapter.requires_grad_(False)  # it trains once set active
    for module in copies.values():
        module.requires_grad_(False)


def _check_inputs(model: nn.Module, weights: dict[str, float], how: str, rank: int | None) -> None:
    """Raise a one-line error for a bad ``how``, ``weights`` or ``rank``, or an adapter that is not plain B·A."""
    if how not in ("linear", "cat", "svd"):
        raise ValueError(f"how must be linear|cat|svd, got {how!r}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("combine_adapters needs at least one adapter weight")
    names = adapter_names(model)  # one walk of the model, not one per weight
    for a, w in weights.items():
        if a not in names:
            raise KeyError(f"no adapter named {a!r}; the model has {names}")
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"combine_adapters: the weight of {a!r} must be a finite number, got {w!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ValueError(f"combine_adapters: rank must be a positive integer, got {rank!r}")
    for layer in lora_layers(model):
        for a in weights:
            if a in layer.adapters and not layer.adapters[a].additive:
                raise ValueError(f"combine_adapters: adapter {a!r} is a {type(layer.adapters[a]).__name__}, "
                                 "not a plain B·A update; only plain LoRA adapters combine")


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
