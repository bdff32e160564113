"""Losses the training loop can use in place of a model's own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.nn import functional as F


def label_smoothed_loss(epsilon: float, shift_tokens: bool = True) -> Callable[[Any, Any], Tensor]:
    """``loss_fn(outputs, batch)``: mean cross-entropy of ``outputs.logits`` against ``batch["labels"]`` with
    label smoothing ``epsilon``, labels ``-100`` ignored, in fp32 — what transformers' own loss computes, smoothed.

    Logits ``(B, C)`` (classification) or ``(B, T, V)`` (tokens; ``shift_tokens``: position t predicts label
    t+1, as in causal LMs; off for encoder-decoders, whose labels are already aligned).
    """
    def loss(outputs: Any, batch: Any) -> Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        labels = batch["labels"]
        if logits.dim() == 3 and shift_tokens:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten().to(logits.device),
                               ignore_index=-100, label_smoothing=epsilon)

    return loss
