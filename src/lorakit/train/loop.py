"""The training loop of ``lorakit train``: AdamW over the trainable (LoRA) parameters, resumable bit for bit.

    lorakit.add_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    result = train(model, examples, collate, TrainConfig(output_dir="out", max_steps=1000, save_every=100))
    # killed? the same call with resume_from=True continues exactly where the last checkpoint was

``output_dir`` receives ``metrics.jsonl`` (one JSON record per log / eval), ``training_curves.png``,
``adapter/`` (final adapter, PEFT format), ``best/`` (best adapter by the tracked eval metric),
``checkpoint/`` (training state, see :mod:`lorakit.train.state`) and ``tensorboard/`` when asked.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..core.checkpoint import save_adapter
from ..core.model import active_adapter
from ..files import save_tensors
from . import distributed as D
from .config import LinearWarmupSchedule, TrainConfig, TrainResult, param_groups
from .losses import label_smoothed_loss
from .plots import plot_curves, read_metrics
from .state import (
    CheckpointError,
    TrainState,
    capture_rng,
    checkpoint_candidates,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    set_aside,
    write_text_atomic,
)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
# Config fields that shape the trajectory: a resume that changes one of them cannot continue exactly. (The run's
# length, epochs / max_steps, may change: a resume can extend a run.)
_TRAJECTORY = ("lr", "lora_plus_ratio", "weight_decay", "batch_size", "grad_accum", "warmup_steps", "warmup_ratio",
               "scheduler", "max_grad_norm", "seed", "shuffle", "drop_last", "group_by_length", "bf16")


def check_environment(config: TrainConfig) -> None:
    """What :func:`train` needs beyond its arguments, checked before anything is written: the device exists,
    and the optional packages that ``tensorboard`` / ``plot`` / ``progress`` ask for are installed."""
    if config.device is not None:
        device = torch.device(config.device)
        backend = getattr(torch, device.type, None) if device.type != "cpu" else None
        if device.type != "cpu" and not (backend is not None and hasattr(backend, "is_available")
                                         and backend.is_available()):
            raise ValueError(f"device {config.device!r} is not available on this machine")
        if device.index is not None and device.type != "cpu" and device.index >= backend.device_count():
            raise ValueError(f"device {config.device!r}: this machine has {backend.device_count()} {device.type} "
                             "device(s)")
    import importlib
    import importlib.util

    for flag, package, module in OPTIONAL_IMPORTS:
        if flag is not None and not getattr(config, flag):
            continue
        needs = f"{flag}=True needs" if flag is not None else "training needs"
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"{needs} the {package} package: pip install {package}")
        try:  # installed is not enough: a package that fails to import would fail the run after its first write
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (whatever it raises, the run cannot use it)
            reason = (str(e).strip().splitlines() or [""])[0]
            raise ImportError(f"{needs} the {package} package, which is installed but fails to import "
                              f"({module}: {type(e).__name__}: {reason})") from None


# The optional packages a run imports, one line each: (TrainConfig flag that asks for it, None: every run;
# package to install; the module the run imports from it). check_environment imports each before the first write.
OPTIONAL_IMPORTS: tuple[tuple[str | None, str, str], ...] = (
    ("tensorboard", "tensorboard", "torch.utils.tensorboard"),  # _open_logs: SummaryWriter
    ("plot", "matplotlib", "matplotlib.backends.backend_agg"),  # plots.plot_curves, on the Agg backend
    (None, "tqdm", "tqdm.auto"),  # _open_logs: the progress bar (built disabled with progress=False)
)


def batches_per_epoch(num_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    """Global micro-batches per epoch (a ragged last batch is kept if every rank gets at least one example);
    ValueError when the examples make no batch."""
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the world size {world_size}")
    tail = num_examples % config.batch_size
    n = num_examples // config.batch_size + int(tail >= world_size and not config.drop_last)
    if n == 0:
        raise ValueError(f"{num_examples} examples make no batch of {config.batch_size} (drop_last={config.drop_last})")
    return n


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' activation checkpointing (``activation_checkpointing_enable``, or the older
    ``gradient_checkpointing_enable``); with frozen input embeddings their output is made to require grad
    (``enable_input_require_grads``, as PEFT does) so checkpointed blocks still backpropagate into LoRA."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"gradient_checkpointing=True needs a transformers model (gradient_checkpointing_enable()); "
                         f"{type(model).__name__} has none")
    enable()
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if get_emb is not None else None
    if emb is not None and not any(p.requires_grad for p in emb.parameters()):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            emb.register_forward_hook(_output_requires_grad)


def _output_requires_grad(module: nn.Module, inputs: Any, output: Tensor) -> None:
    output.requires_grad_(True)


def train(
    model: nn.Module,
    train_data: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    config: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    resume_from: str | Path | bool | None = None,
    step_hook: StepHook | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters (its LoRA adapter) on ``train_data``.

    Args:
        model: a model that already has an adapter (``lorakit.add_lora``); changed in place.
        train_data: a map-style dataset (``len`` and ``[i]``), e.g. a list of example dicts.
        collate: list of examples -> batch (a dict of tensors is passed as ``model(**batch)``, a tuple or
            list as ``model(*batch)``, anything else as ``model(batch)``).
        config: a :class:`TrainConfig`.
        evaluate: ``evaluate(model) -> {name: value}``, called in eval mode under ``no_grad`` (on every rank;
            rank 0's values count).
        loss_fn: ``loss_fn(outputs, batch) -> scalar``; None uses ``outputs.loss`` (transformers models given
            ``labels``), or with ``config.label_smoothing`` the smoothed cross-entropy of ``outputs.logits``.
        resume_from: a checkpoint directory, or True for ``config.output_dir``: continue that run exactly.
        step_hook: a :class:`StepHook` run with every step, e.g. ``lorakit.AdaLoraAllocator``.
    """
    if config.label_smoothing:
        if loss_fn is not None:
            raise ValueError("config.label_smoothing smooths the model's own loss; with loss_fn= smooth inside it")
        shift = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        loss_fn = label_smoothed_loss(config.label_smoothing, shift_tokens=shift)
    return _Run(model, train_data, collate, config, evaluate, loss_fn, step_hook).run(resume_from)


class StepHook(Protocol):
    """What the loop calls besides the optimizer (AdaLoRA's rank allocator is one).

    ``regularization()`` is added to every micro-batch's loss; ``step(global_step)`` runs after each
    optimizer step, before the gradients are cleared (steps count from 1); ``state_dict()`` (tensors
    under ``"tensors"``, the rest JSON) and ``load_state_dict`` go into and out of training checkpoints.
    """

    def regularization(self) -> Tensor: ...
    def step(self, global_step: int) -> object: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def total_steps(num_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    """The optimizer steps of a run on ``num_examples`` (known before training: AdaLoRA's schedule needs it)."""
    steps_per_epoch = math.ceil(batches_per_epoch(num_examples, config, world_size) / config.grad_accum)
    return config.max_steps or config.epochs * steps_per_epoch


def resume(model: nn.Module, train_data: Sequence[Any], collate: Callable[[list[Any]], Any], config: TrainConfig,
           **kwargs: Any) -> TrainResult:
    """``train(..., resume_from=True)``: continue from ``config.output_dir``'s last checkpoint."""
    return train(model, train_data, collate, config, resume_from=True, **kwargs)


class _Run:
    """One training run; its methods are the loop's parts (setup, step, log, eval, save)."""

    def __init__(self, model, data, collate, config: TrainConfig, evaluate, loss_fn, step_hook=None):
        self.model, self.data, self.collate, self.cfg = model, data, collate, config
        self.evaluate, self.loss_fn, self.hook = evaluate, loss_fn, step_hook
        self.out = Path(config.output_dir)
        self.state = TrainState()

    # ----- setup -----------------------------------------------------------------------------------------
    def run(self, resume_from: str | Path | bool | None) -> TrainResult:
        cfg = self.cfg
        self.info = info = D.init_distributed(cfg.device)
        try:
            return self._run(resume_from)
        finally:
            D.cleanup(info)

    def _run(self, resume_from) -> TrainResult:
        cfg, info = self.cfg, self.info
        check_environment(cfg)
        n = len(self.data)
        self.n_batches = batches_per_epoch(n, cfg, info.world_size)
        self.steps_per_epoch = math.ceil(self.n_batches / cfg.grad_accum)
        self.damaged: Path | None = None  # a checkpoint found damaged on resume, set aside at the next save
        self.total = total_steps(n, cfg, info.world_size)  # the same count AdaLoRA's schedule was planned with
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.lengths = [_length(self.data[i], i) for i in range(n)] if cfg.group_by_length else None
        self.adapter = active_adapter(self.model) or "default"
        self.use_bf16 = _resolve_bf16(cfg.bf16, info.device)
        self.model.to(info.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.wrapped = D.wrap_model(self.model, info, cfg.fsdp)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LinearWarmupSchedule(cfg.scheduler, warmup, self.total))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        ckpt = self._load(resume_from) if resume_from else None
        if ckpt is None:
            _seed_all(cfg.seed + info.rank)
        self._open_logs(resumed_step=self.state.global_step if ckpt else None)
        try:
            self._loop()
        finally:
            self._close_logs()
        self._save_adapter(self.out / "adapter")
        if info.is_main and self.cfg.plot:
            plot_curves(read_metrics(self.out / METRICS_FILE), self.out / PLOT_FILE)
        s = self.state
        final = self.last_eval[1] if self.last_eval and self.last_eval[0] == s.global_step else None
        return TrainResult(s.global_step, s.best_metric, s.best_step, s.stopped_early, self.out, final)

    def _load(self, resume_from):
        root = self.cfg.output_dir if resume_from is True else resume_from
        candidates = checkpoint_candidates(root)
        if not candidates:
            raise FileNotFoundError(f"no complete training checkpoint in {root}")
        for i, path in enumerate(candidates):
            try:
                ckpt = load_checkpoint(path)
                self._check_fits(ckpt)
                break
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise
                warnings.warn(f"resume: {e}; falling back to the previous checkpoint {candidates[i + 1]}",
                              UserWarning, stacklevel=4)
                self.damaged = path
        if self.hook is not None:  # read and checked before the model or optimizer change
            self.hook.load_state_dict(_read_hook_state(ckpt.path))
        saved = ckpt.config.get("train", {})
        changed = [k for k in _TRAJECTORY if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed:
            warnings.warn(f"resume: {changed} differ from the checkpoint's config; the run will not continue "
                          "exactly", UserWarning, stacklevel=4)
        before = saved.get("max_steps") or saved.get("epochs", 0) * self.steps_per_epoch
        stretched = self.cfg.scheduler != "constant" or (self.cfg.warmup_ratio and not self.cfg.warmup_steps)
        if before and before != self.total and stretched:
            warnings.warn(f"resume: the run now ends at step {self.total} instead of {before}; the learning-rate "
                          "schedule is stretched to the new length", UserWarning, stacklevel=4)
        D.load_trainable(self.model, ckpt.trainable)
        if D.is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, ckpt.optimizer,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(ckpt.optimizer)
        # the schedule's shape comes from this run's config (a resume may extend max_steps), its position from disk
        self.scheduler.load_state_dict({**ckpt.scheduler, "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        sched = self.scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)  # as LambdaLR computes it: the same bits on a plain resume
        self.generator.set_state(ckpt.epoch_generator)
        if len(ckpt.rng) == self.info.world_size:
            restore_rng(ckpt.rng[self.info.rank])
        else:
            warnings.warn(f"resume: checkpoint written by {len(ckpt.rng)} ranks, now {self.info.world_size}; RNG "
                          "streams are reseeded", UserWarning, stacklevel=4)
            _seed_all(self.cfg.seed + self.info.rank + ckpt.state.global_step)
        self.state = ckpt.state
        return ckpt

    def _check_fits(self, ckpt) -> None:
        """The checkpoint's tensors and optimizer state fit this model and optimizer (checked before any is
        loaded, so a checkpoint that does not fit leaves both untouched)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        file = ckpt.path / "trainable.safetensors"
        if set(params) != set(ckpt.trainable):
            missing, extra = sorted(set(params) - set(ckpt.trainable)), sorted(set(ckpt.trainable) - set(params))
            raise CheckpointError(f"{file}: does not match the model's trainable parameters: missing {missing[:3]}, "
                                  f"unexpected {extra[:3]}")
        for name, p in params.items():
            t = ckpt.trainable[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{file}: {name} is {t.dtype} {tuple(t.shape)}, the model has {p.dtype} "
                                      f"{tuple(p.shape)}")
        if D.is_sharded(self.model):
            return  # FSDP's full optimizer state is keyed by name; set_optimizer_state_dict checks it
        file, saved = ckpt.path / "optimizer.pt", ckpt.optimizer["param_groups"]
        mine = self.optimizer.param_groups
        if len(saved) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, mine, strict=True)):
            raise CheckpointError(f"{file}: its parameter groups do not match this model's trainable parameters")
        by_id = {i: p for a, b in zip(saved, mine, strict=True) for i, p in zip(a["params"], b["params"], strict=True)}
        for i, entry in ckpt.optimizer["state"].items():
            p = by_id.get(i)
            if p is None or not isinstance(entry, dict) or any(
                    isinstance(v, Tensor) and v.dim() and v.shape != p.shape for v in entry.values()):
                raise CheckpointError(f"{file}: the state of parameter {i} does not fit this model")

    # ----- the loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        cfg, s, B = self.cfg, self.state, self.cfg.batch_size
        self.wrapped.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        while s.global_step < self.total and not s.stopped_early:
            self.epoch_start = self.generator.get_state()
            n = len(self.data)
            order = torch.randperm(n, generator=self.generator).tolist() if cfg.shuffle else list(range(n))
            if cfg.group_by_length:
                order = group_by_length(order, self.lengths, LENGTH_GROUP_STEPS * B * cfg.grad_accum)
            batches = [order[i:i + B] for i in range(0, self.n_batches * B, B)]
            for k in range(s.epoch_step, self.steps_per_epoch):
                norm = self._step(batches[k * cfg.grad_accum:(k + 1) * cfg.grad_accum], trainable)
                s.epoch_step, s.global_step = k + 1, s.global_step + 1
                self._after_step(norm)
                if s.global_step >= self.total or s.stopped_early:
                    break
            if s.epoch_step >= self.steps_per_epoch:
                s.epoch, s.epoch_step = s.epoch + 1, 0

    def _step(self, window: list[list[int]], trainable: list[nn.Parameter]) -> Tensor | None:
        """One optimizer step over ``window`` (a list of global micro-batches of example indices)."""
        info, ddp = self.info, isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        for j, indices in enumerate(window):
            batch = self.collate([self.data[i] for i in D.shard(indices, info)])
            self.tokens += _count_tokens(batch)
            batch = _to_device(batch, info.device)
            last = j == len(window) - 1
            with self.wrapped.no_sync() if ddp and not last else nullcontext():
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                    outputs = _call(self.wrapped, batch)
                    loss = self.loss_fn(outputs, batch) if self.loss_fn else _model_loss(outputs)
                    if self.hook is not None:
                        loss = loss + self.hook.regularization()
                (loss / len(window)).backward()
            self.loss_sum += loss.detach().float() / len(window)
        norm = None
        if self.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.hook is not None:
            self.hook.step(self.state.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_steps += 1
        return norm

    def _after_step(self, norm: Tensor | None) -> None:
        cfg, s = self.cfg, self.state
        last = s.global_step >= self.total
        self.bar.update(1)
        if s.global_step % cfg.log_every == 0 or last:
            self._log_train(norm)
        at_epoch_end = s.epoch_step == self.steps_per_epoch
        if self.evaluate is not None and (last or (s.global_step % cfg.eval_every == 0 if cfg.eval_every
                                                    else at_epoch_end)):
            self._eval()
        if cfg.save_every and (s.global_step % cfg.save_every == 0 or last or s.stopped_early):
            self._save_checkpoint()

    # ----- logging -----------------------------------------------------------------------------------------
    def _open_logs(self, resumed_step: int | None) -> None:
        from tqdm.auto import tqdm

        main = self.info.is_main
        self.jsonl = self.tb = None
        if main and self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        self.bar = tqdm(total=self.total, initial=self.state.global_step, disable=not (main and self.cfg.progress),
                        desc="train", dynamic_ncols=True)
        self.loss_sum, self.loss_steps, self.tokens = torch.zeros((), device=self.info.device), 0, 0
        self.t_last = time.perf_counter()
        if not main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / METRICS_FILE
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resumed_step] if (
            resumed_step is not None and path.exists()) else []
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))  # drop records past the checkpoint
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in _close_logs)

    def _close_logs(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

    def _record(self, record: dict[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def _log_train(self, norm: Tensor | None) -> None:
        s, info = self.state, self.info
        loss = D.mean_across(self.loss_sum / max(1, self.loss_steps), info).item()  # the only sync of a step
        now = time.perf_counter()
        rec = {"kind": "train", "step": s.global_step, "epoch": round(s.epoch + s.epoch_step / self.steps_per_epoch, 4),
               "loss": loss, "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": self.tokens * info.world_size / max(now - self.t_last, 1e-9)}
        if norm is not None:
            rec["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.loss_sum.zero_()
        self.loss_steps, self.tokens, self.t_last = 0, 0, now
        self._record(rec)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")

    # ----- eval, best, early stopping ---------------------------------------------------------------------
    def _eval(self) -> None:
        cfg, s = self.cfg, self.state
        self.wrapped.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
        self.wrapped.train()
        metrics = D.broadcast_object(metrics, self.info)
        self._record({"kind": "eval", "step": s.global_step, **metrics})
        self.last_eval = (s.global_step, metrics)
        name = cfg.metric or next(iter(metrics), None)
        if name is None:
            return
        if name not in metrics:
            raise KeyError(f"metric {name!r} is not among evaluate()'s results {sorted(metrics)}")
        value = metrics[name]
        better = not math.isnan(value) and (s.best_metric is None or (
            value > s.best_metric if cfg.greater_is_better else value < s.best_metric))  # NaN is never the best
        if better:
            s.best_metric, s.best_step, s.bad_evals = value, s.global_step, 0
            self._save_adapter(self.out / "best")
        else:
            s.bad_evals += 1
            if cfg.early_stopping_patience and s.bad_evals >= cfg.early_stopping_patience:
                s.stopped_early = True

    # ----- saving ------------------------------------------------------------------------------------------
    def _save_adapter(self, path: Path) -> None:
        with D.full_params(self.model):
            if self.info.is_main:
                save_adapter(self.model, path, adapter=self.adapter)
        D.barrier(self.info)

    def _save_checkpoint(self) -> None:
        info = self.info
        if D.is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict()
        rng = D.gather_objects(capture_rng(), info)
        with D.full_params(self.model):  # collective under FSDP; inside, parameters are plain tensors
            if info.is_main:
                if self.damaged is not None and self.damaged.exists():
                    set_aside(self.damaged)  # so this save keeps the good checkpoint we resumed from
                    self.damaged = None
                run = {"train": asdict(self.cfg), "num_examples": len(self.data), "world_size": info.world_size}
                save_checkpoint(self.out, state=self.state, trainable=D.trainable_full(self.model), optimizer=optim,
                                scheduler=self.scheduler.state_dict(), rng=rng, epoch_generator=self.epoch_start,
                                config=run, write_adapter=self._adapter_writer)
        D.barrier(info)

    def _adapter_writer(self, path: Path) -> None:
        save_adapter(self.model, path, adapter=self.adapter)
        if self.hook is not None:  # beside adapter/ in the checkpoint being written: swapped in with it
            state = self.hook.state_dict()
            meta = {k: json.dumps(v, sort_keys=True) for k, v in state.items() if k != "tensors"}
            save_tensors({k: v.contiguous().cpu() for k, v in state["tensors"].items()}, path.parent / HOOK_FILE,
                         metadata=meta)


# ----- helpers ---------------------------------------------------------------------------------------------
HOOK_FILE = "step_hook.safetensors"


def _read_hook_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / HOOK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume with a step hook: {checkpoint} has no {HOOK_FILE} (the run had no hook)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return {**{k: json.loads(v) for k, v in meta.items() if k != "format"}, "tensors": tensors}


def _resolve_bf16(flag: bool | None, device: torch.device) -> bool:
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if flag and not ok:
            raise ValueError(f"bf16=True but {torch.cuda.get_device_name(device)} does not support bf16")
        return ok if flag is None else flag
    return bool(flag)


def _seed_all(seed: int) -> None:
    import random
    import sys

    torch.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _model_loss(outputs: Any) -> Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: put labels in the batch or pass loss_fn=")
    return loss


LENGTH_GROUP_STEPS = 50
"""``group_by_length`` sorts windows of this many optimizer steps' examples."""


def group_by_length(order: list[int], lengths: list[int], window: int) -> list[int]:
    """``order`` cut into consecutive windows of ``window`` indices, each sorted longest first (stable):
    batches then hold examples of similar length, and the windows keep the shuffle's randomness."""
    return [i for start in range(0, len(order), window)
            for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]


def _length(example: Any, i: int) -> int:
    try:
        return len(example["input_ids"])
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"group_by_length: example {i} has no 'input_ids' to measure") from None


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), Tensor):
            return batch["input_ids"].numel()
    first = next(iter(batch.values()), None) if isinstance(batch, Mapping) else (
        batch[0] if isinstance(batch, (tuple, list)) else batch)
    return first.shape[0] if isinstance(first, Tensor) and first.dim() else 0


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
