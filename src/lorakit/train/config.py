"""`TrainConfig` (how to train, validated), `TrainResult`, the LR schedule and the AdamW parameter groups."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..variants.loraplus import loraplus_param_groups

Schedule = Literal["cosine", "linear", "constant"]
@dataclass
class TrainConfig:
    """How to train. Steps are optimizer steps (``grad_accum`` micro-batches each).

    Args:
        output_dir: where adapters, checkpoints, metrics and the plot go.
        lr: AdamW learning rate (peak, after warmup).
        lora_plus_ratio: LoRA+ (arXiv 2402.12354): ``lora_B`` weights train at ``ratio * lr``; None = off.
        weight_decay: AdamW decoupled weight decay, on every trainable parameter.
        epochs / max_steps: length of training; ``max_steps`` wins when set.
        batch_size: examples per micro-batch, across all ranks (each of N ranks gets ``batch_size / N``).
        grad_accum: micro-batches per optimizer step.
        warmup_steps / warmup_ratio: linear warmup from 0 (steps win when > 0).
        scheduler: decay after warmup: ``"linear"`` to 0, ``"cosine"`` to 0, or ``"constant"``.
        max_grad_norm: clip the global gradient norm to this; None = no clipping.
        label_smoothing: cross-entropy against ``(1 - eps)`` on the label and ``eps`` spread over all classes
            (tokens for a causal LM; the LoRA paper's GPT-2 runs use 0.1), in place of the model's own loss.
        seed: seeds torch / python / numpy RNGs (plus the rank) and the data order.
        shuffle / drop_last: data order per epoch; drop the last incomplete batch.
        group_by_length: batch examples of similar length (less padding): the shuffled order is cut into
            windows of 50 optimizer steps' examples, each sorted by length (as transformers'
            ``LengthGroupedSampler``). Examples must be mappings with ``input_ids``.
        bf16: bf16 autocast. None = on for CUDA devices that support it, off elsewhere; True forces it
            (CPU autocast included).
        gradient_checkpointing: call ``model.gradient_checkpointing_enable()`` (transformers models) and make
            the inputs require grad when the embeddings are frozen.
        eval_every: run ``evaluate`` every this many steps; None = at the end of every epoch. Always at the end.
        save_every: write a training checkpoint every this many steps (and at the end); None = never.
        early_stopping_patience: stop after this many evaluations without improvement; None = never.
        metric / greater_is_better: the key of ``evaluate``'s dict that picks ``best/`` (None = its first key).
        log_every: steps between ``metrics.jsonl`` records / progress-bar updates of loss, lr, tokens/s.
        tensorboard: also log to ``output_dir/tensorboard`` (needs the tensorboard package).
        progress: show a tqdm progress bar (rank 0 only).
        plot: write ``training_curves.png`` at the end (matplotlib).
        device: ``"cpu"``, ``"cuda"``...; None = ``cuda:<LOCAL_RANK>`` if available else the CPU.
        fsdp: under torchrun, shard with FSDP2 (``fully_shard``) instead of DDP.
    """

    output_dir: str = "lorakit-output"
    lr: float = 2e-4
    lora_plus_ratio: float | None = None
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: Schedule = "linear"
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    group_by_length: bool = False
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    eval_every: int | None = None
    save_every: int | None = 500
    early_stopping_patience: int | None = None
    metric: str | None = None
    greater_is_better: bool = True
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True
    device: str | None = None
    fsdp: bool = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need lr > 0, weight_decay >= 0, warmup_steps >= 0, 0 <= warmup_ratio < 1")
        if self.lora_plus_ratio is not None and self.lora_plus_ratio <= 0:
            raise ValueError(f"lora_plus_ratio must be > 0, got {self.lora_plus_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {self.max_grad_norm}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device {self.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None


def check_type(name: str, value: Any, hint: Any) -> None:
    """Raise ValueError unless ``value`` has the annotated type: booleans strictly (``"false"`` and 1 are not
    booleans, ``True`` is not an int), floats finite, ``Literal`` values among the allowed ones."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if any(_matches(value, t) for t in options):
        return
    if any(t is float for t in options) and isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    allowed = " or ".join(_type_name(t) for t in options)
    raise ValueError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")


def _matches(value: Any, t: Any) -> bool:
    if t is type(None):
        return value is None
    if typing.get_origin(t) is Literal:
        return isinstance(value, str) and value in typing.get_args(t)
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, t)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "None"
    if typing.get_origin(t) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(t)))
    return {bool: "true/false", int: "an integer", float: "a number"}.get(t, getattr(t, "__name__", str(t)))


@dataclass
class TrainResult:
    """What a run did: last step, best metric (and its step), whether it stopped early, where files are, and
    the metrics of the evaluation at the last step (None without ``evaluate``)."""

    global_step: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    output_dir: Path
    final_metrics: dict[str, float] | None = None


class LinearWarmupSchedule:
    """LR multiplier for ``LambdaLR``: linear warmup from 0, then linear / cosine decay to 0, or constant."""

    def __init__(self, kind: Schedule, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: :func:`lorakit.loraplus_param_groups` with
    ``config.lr`` and ``config.lora_plus_ratio`` (None: one group)."""
    return loraplus_param_groups(model, config.lr, config.lora_plus_ratio)
