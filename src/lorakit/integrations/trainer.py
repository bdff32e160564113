"""transformers' ``Trainer`` over a lorakit model: checkpoints hold the adapter in PEFT's format.

``Trainer`` writes a checkpoint with ``model.save_pretrained`` and reads one back (``resume_from_checkpoint``,
``load_best_model_at_end``) with special cases for ``peft.PeftModel`` that it recognises by class; a model
adapted in place by lorakit is still a ``BertForSequenceClassification``, so a plain ``Trainer`` would write
the whole model under lorakit's wrapped names. lorakit therefore makes ``save_pretrained`` refuse on an
adapted model (a plain ``Trainer`` stops at its first save with that message), and :class:`LoraTrainerMixin`
replaces the three places where ``Trainer`` touches model weights on disk:

- ``_save`` (checkpoints and ``save_model``): every adapter with :func:`lorakit.save_adapter` (``default`` at
  the top, others in ``<name>/``), plus the tokenizer/processor and ``training_args.bin`` as ``Trainer`` does;
- ``_load_from_checkpoint`` (``resume_from_checkpoint``) and ``_load_best_model`` (``load_best_model_at_end``):
  the saved weights are copied into the model's existing adapters in place (:func:`restore_adapters`), so
  the parameters the optimizer holds stay the same objects.

Optimizer, scheduler, RNG and ``trainer_state.json`` are ``Trainer``'s own. Works single-process and under
DDP (``torchrun``); FSDP and DeepSpeed shard the parameters this code reads and are refused at construction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..core.checkpoint import CONFIG_NAME, load_adapter, save_adapter
from ..core.layers import LoraLayer
from ..core.model import active_adapter, adapter_names, delete_adapter, lora_layers, set_adapter
from ..core.saved import SavedModule

_STAGING = "lorakit_restore"  # prefix of the temporary adapter names while a checkpoint is checked


def has_lora(model: nn.Module) -> bool:
    return bool(adapter_names(model))


def adapter_dirs(path: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """Where :func:`lorakit.save_adapter` puts each adapter under ``path``; an error names any missing."""
    path = Path(path)
    dirs = {name: path if name == "default" else path / name for name in names}
    missing = [name for name, d in dirs.items() if not (d / CONFIG_NAME).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} holds no lorakit/PEFT adapter for {missing} (no {CONFIG_NAME}); "
                                "was it written by lorakit.integrations.LoraTrainer?")
    return dirs


def restore_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy every adapter of ``model`` from the checkpoint at ``path`` into the model, in place.

    Each adapter is first loaded beside the existing ones under a temporary name with
    :func:`lorakit.load_adapter` (every key, shape, dtype and value checked), compared layer by layer
    with the one it replaces (same layers, shapes and scaling), and only when all match are the weights
    copied over. On any error the model is as it was. Afterwards the active adapter and every
    ``requires_grad`` flag are as before and the parameter objects are the same ones (an optimizer built
    on them keeps working); the global RNG is not consumed.
    """
    names = adapter_names(model)
    if any(name.startswith(_STAGING) for name in names):
        raise ValueError(f"adapter names starting with {_STAGING!r} are reserved for restoring checkpoints")
    dirs = adapter_dirs(path, names)
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError("cannot restore adapters into a merged model; unmerge(model) first")
    active = active_adapter(model)
    trainable = {p: p.requires_grad for p in model.parameters()}
    # load_adapter writes trained biases (bias="all"/"lora_only") straight into the base: keep them to undo
    biases = {p: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    staged: dict[str, str] = {}
    done = False
    try:
        for i, (name, d) in enumerate(dirs.items()):
            with torch.random.fork_rng(devices=[]):  # the staged adapter's random init must not move the RNG
                load_adapter(model, d, adapter=f"{_STAGING}{i}")
            staged[name] = f"{_STAGING}{i}"
        pairs = [pair for name, tmp in staged.items() for pair in _pairs(model, name, tmp)]
        with torch.no_grad():
            for into, source in pairs:
                into.load_state_dict(source.state_dict())
        done = True
    finally:
        for tmp in staged.values():
            delete_adapter(model, tmp)
        set_adapter(model, active)
        with torch.no_grad():
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            if not done:
                for p, value in biases.items():
                    p.copy_(value)


def _pairs(model: nn.Module, name: str, staged: str) -> list[tuple[nn.Module, nn.Module]]:
    """(existing, staged) module pairs of adapter ``name``; an error naming where the two differ."""
    pairs, problems = [], []
    for path, module in model.named_modules():
        held = module.adapters if isinstance(module, LoraLayer) else (
            module.copies if isinstance(module, SavedModule) else None)
        if held is None or (name not in held and staged not in held):
            continue
        if name not in held or staged not in held:
            problems.append(f"{path}: {'only in the checkpoint' if name not in held else 'not in the checkpoint'}")
            continue
        into, source = held[name], held[staged]
        shapes = {k: tuple(v.shape) for k, v in into.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in source.state_dict().items()}
        if shapes != found:
            problems.append(f"{path}: shapes {found} in the checkpoint, {shapes} in the model")
        elif getattr(into, "scaling", None) != getattr(source, "scaling", None):
            problems.append(f"{path}: scaling {source.scaling} in the checkpoint, {into.scaling} in the model")
        pairs.append((into, source))
    if problems:
        raise ValueError(f"the checkpoint's adapter {name!r} does not match the model's: " + "; ".join(problems[:3]))
    return pairs


class LoraTrainerMixin:
    """Put before any ``transformers.Trainer`` subclass: ``class MyTrainer(LoraTrainerMixin, DPOTrainer)``.

    On a model without lorakit adapters every method falls through to the ``Trainer`` it is mixed into.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if has_lora(self.model) and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError("LoraTrainer supports single-process and DDP (torchrun) training; for FSDP use "
                             "`lorakit train` under torchrun")

    def _lora_model(self) -> nn.Module | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if has_lora(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._lora_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        for name in adapter_names(model):
            save_adapter(model, output_dir, adapter=name)
        processor = self.processing_class
        if processor is None:
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self._lora_model() if model is None else self.accelerator.unwrap_model(model)
        if target is None or not has_lora(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        model = self._lora_model()
        if model is None:
            return super()._load_best_model()
        restore_adapters(model, self.state.best_model_checkpoint)
        return None


class LoraTrainer(LoraTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints, ``save_model`` and best-model restore use the adapter."""
