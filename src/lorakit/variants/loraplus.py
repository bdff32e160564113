"""LoRA+ (Hayou et al., 2024, arXiv 2402.12354): B trains at a higher learning rate than A."""

from __future__ import annotations

import math

from torch import nn

from ..core.layers import Adapter


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
