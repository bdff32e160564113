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

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..core.checkpoint import CONFIG_NAME, load_adapter, lora_state_dict, save_adapter
from ..core.layers import LoraLayer
from ..core.model import adapter_config, adapter_names, lora_layers
from ..core.saved import SavedModule


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

    Each adapter is loaded with :func:`lorakit.load_adapter` (every key, shape, dtype and value checked)
    into a bare stand-in that holds, at the same paths, the very base layers it wraps (shared; copies where
    the adapter's initialiser rewrites the base, as PiSSA does), then compared layer by layer with the
    model's adapter (same layers, shapes and scaling); only when all adapters match are the weights copied. On any error the model is as it was. The model's adapters,
    active adapter, ``requires_grad`` flags and parameter objects stay the same (an optimizer built on them
    keeps working); the global RNG is not consumed.
    """
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no lorakit adapter to restore; add_lora or load_adapter first")
    dirs = adapter_dirs(path, names)
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError("cannot restore adapters into a merged model; unmerge(model) first")
    trainable = {p: p.requires_grad for p in model.parameters()}
    # load_adapter writes trained biases (bias="all"/"lora_only") straight into the shared base: keep them
    biases = {p: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    done = False
    try:
        pairs, tensors = [], []
        for name, d in dirs.items():
            stand_in = _stand_in(model, name)
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # the staged adapter's random init must not move the RNG; a copied base (see _stand_in) has
                # been through the initialiser again, so its fingerprint says nothing
                warnings.filterwarnings("ignore", message="adapter .* was trained on different base weights")
                load_adapter(stand_in, d, adapter=name)
            pairs += _pairs(model, stand_in, name)
            staged = lora_state_dict(stand_in, name)  # trained biases: aliases of the parameters on both sides
            tensors += [(t, staged[k]) for k, t in lora_state_dict(model, name).items() if k.endswith(".bias")]
        with torch.no_grad():
            for into, source in pairs:
                into.load_state_dict(source.state_dict())
            for into, source in tensors:
                into.copy_(source)
        done = True
    finally:
        with torch.no_grad():
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            if not done:
                for p, value in biases.items():
                    p.copy_(value)


def _stand_in(model: nn.Module, name: str) -> nn.Module:
    """A bare module tree with, at their paths in ``model``, the base layers adapter ``name`` wraps, the
    originals of its ``modules_to_save`` and, with ``bias="all"``, every other leaf module with a bias (the
    same objects, or copies for an initialiser that rewrites the base): what ``add_lora`` saw and the
    checkpoint holds, nothing else."""
    root = nn.Module()
    wrappers = [p for p, m in model.named_modules() if isinstance(m, LoraLayer | SavedModule)]
    config = adapter_config(model, name)
    trains_all_biases = config.bias == "all"
    # an initialiser that rewrites the base (PiSSA, OLoRA, ...) must run on copies: this base is already its result
    private = config.init not in ("kaiming", "gaussian")
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            inner = module.base_layer
        elif isinstance(module, SavedModule) and name in module.copies:
            inner = module.original
        elif (trains_all_biases and isinstance(module._parameters.get("bias"), nn.Parameter)
              and not any(True for _ in module.children()) and path not in wrappers
              and not any(path.startswith(w + ".") for w in wrappers)):
            inner = module  # bias="all": the checkpoint holds every bias of the model
        else:
            continue
        if private:
            inner = copy.deepcopy(inner)
        *parents, leaf = path.split(".")
        holder = root
        for part in parents:
            if part not in holder._modules:
                holder.add_module(part, nn.Module())
            holder = holder._modules[part]
        holder.add_module(leaf, inner)
    return root


def _held(module: nn.Module) -> nn.ModuleDict | None:
    """A LoRA layer's adapters or a ``modules_to_save`` holder's copies (by adapter name)."""
    if isinstance(module, LoraLayer):
        return module.adapters
    return module.copies if isinstance(module, SavedModule) else None


def _pairs(model: nn.Module, stand_in: nn.Module, name: str) -> list[tuple[nn.Module, nn.Module]]:
    """(model's, checkpoint's) module pairs of adapter ``name``; an error naming where the two differ."""
    pairs, problems = [], []
    staged = {p: _held(m) for p, m in stand_in.named_modules() if _held(m) is not None}
    for path, module in model.named_modules():
        held = _held(module)
        if held is None or name not in held:
            continue
        into, source = held[name], staged[path][name] if name in staged.get(path, {}) else None
        if source is None:
            problems.append(f"{path}: not in the checkpoint")
            continue
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
