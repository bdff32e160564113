"""Adapter checkpoints in PEFT's on-disk format (loadable by ``PeftModel.from_pretrained`` and vLLM).

A checkpoint is a directory with ``adapter_config.json`` (PEFT's field names) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight`` /
``.lora_B.weight`` (embeddings: ``.lora_embedding_A`` ``(r, num)`` / ``.lora_embedding_B`` ``(dim, r)``),
plus trained biases and ``modules_to_save`` tensors under their module paths. A fused-slice adapter is
written as the equivalent plain LoRA of rank ``n_on * r`` with a block-structured B.

Loading never unpickles, checks every key, shape, dtype and value before touching the model, and
warns when the base weights differ from those the adapter was trained on (fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import LORAKIT_KEY, LoraConfig
from .layers import LoraEmbedding, LoraLayer, SlicedAdapter
from .model import adapter_config, adapter_names, commit_adapter, plan_adapter
from .saved import SavedModule
from .targets import find_targets
from .variants import changed_base, plain_lora_pair

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key and expected vs found."""


# ----- state dict -------------------------------------------------------------------------------------
def _adapter_tensors(layer: LoraLayer, adapter, path: str, convert: bool = False) -> dict[str, Tensor]:
    extra = {f"{path}.{k}": v for k, v in adapter.extra_tensors().items()}
    if convert and changed_base(adapter):  # the equivalent plain LoRA (rank 2r) for the original base
        A, B = plain_lora_pair(adapter)
        return {f"{path}.lora_A.weight": A.reshape(-1, *adapter.lora_A.weight.shape[1:]),
                f"{path}.lora_B.weight": B.reshape(B.shape[0], -1, *adapter.lora_B.weight.shape[2:]), **extra}
    if isinstance(layer, LoraEmbedding):
        return {f"{path}.lora_embedding_A": adapter.lora_A.weight.T, f"{path}.lora_embedding_B": adapter.lora_B.weight,
                **extra}
    if isinstance(adapter, SlicedAdapter):
        A, B = adapter.plain_pair()
    else:
        A, B = adapter.lora_A.weight, adapter.lora_B.weight
    return {f"{path}.lora_A.weight": A, f"{path}.lora_B.weight": B, **extra}


def lora_state_dict(model: nn.Module, adapter: str = "default", convert_to_lora: bool = False) -> dict[str, Tensor]:
    """The tensors of adapter ``adapter`` under PEFT's checkpoint keys (detached, in model dtype).

    ``convert_to_lora``: layers whose base weight an initialiser replaced (PiSSA, OLoRA...) get the exactly
    equivalent plain LoRA for the original base instead (rank 2r, :func:`~lorakit.core.variants.plain_lora_pair`).
    """
    config = adapter_config(model, adapter)
    out: dict[str, Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.adapters:
            out.update(_adapter_tensors(module, module.adapters[adapter], path, convert_to_lora))
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                out[f"{path}.base_layer.bias"] = bias
        elif isinstance(module, SavedModule) and adapter in module.copies:
            out.update({f"{path}.{k}": v for k, v in module.copies[adapter].state_dict().items()})
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".adapters." not in name and not _in_saved(model, name):
                out[name] = p
    return {PREFIX + k: v.detach() for k, v in out.items()}


def _in_saved(model: nn.Module, param_name: str) -> bool:
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), SavedModule):
            return True
    return False


# ----- save ---------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default",
                 convert_to_lora: bool = False) -> Path:
    """Write ``adapter`` to ``path`` (a non-default adapter goes to ``path/<adapter>``); returns the dir.

    ``convert_to_lora=True``: an adapter whose initialiser replaced base weights (PiSSA, OLoRA...) is written
    as the exactly equivalent plain LoRA of rank 2r for the **original** base (``init_lora_weights: true``),
    which PEFT and vLLM load on the untouched model; other adapters are written as they are.
    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    config = adapter_config(model, adapter)
    out_dir = Path(path) if adapter == "default" else Path(path) / adapter
    tensors = {k: v.contiguous().cpu().clone() for k, v in lora_state_dict(model, adapter, convert_to_lora).items()}
    peft = _peft_config(model, config, adapter)
    if convert_to_lora:
        peft = converted_config(model, adapter, peft)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft, indent=2, sort_keys=True)))
    return out_dir


def _peft_config(model: nn.Module, config: LoraConfig, adapter: str) -> dict:
    paths = [p for p, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.adapters]
    d = config.to_peft_dict()
    # Name targets by their last component when that selects exactly the adapted modules (vLLM reads these).
    leaves = sorted({p.split(".")[-1] for p in paths})
    d["fan_in_fan_out"] = any(
        getattr(m, "fan_in_fan_out", False) for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.adapters
    )
    d["target_modules"] = leaves if find_targets(model, config.replace(target_modules=leaves)) == paths else paths
    for p, m in model.named_modules():
        adapter_obj = m.adapters[adapter] if isinstance(m, LoraLayer) and adapter in m.adapters else None
        if isinstance(adapter_obj, SlicedAdapter):  # exported as plain LoRA of rank n_on * r, same scaling
            n_on = len(adapter_obj.on_slices)
            d["rank_pattern"] = {**d["rank_pattern"], p: n_on * config.rank_for(p)}
            factor = math.sqrt(n_on) if config.use_rslora else n_on
            d["alpha_pattern"] = {**d["alpha_pattern"], p: config.alpha_for(p) * factor}
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    d[LORAKIT_KEY] = {"base_fingerprint": base_fingerprint(model, paths), "slices": config.slices}
    if names := class_names(model):
        d[LORAKIT_KEY]["id2label"] = {str(i): name for i, name in enumerate(names)}
    return d


def converted_config(model: nn.Module, adapter: str, peft: dict) -> dict:
    """``adapter_config.json`` of the plain-LoRA conversion: every rank doubled with the scaling kept
    (``alpha * 2``, rsLoRA ``alpha * sqrt(2)``), ``init_lora_weights: true``; the fingerprint is dropped (it
    was taken on the replaced base)."""
    if peft.get("init_lora_weights") == "loftq":
        raise ValueError(f"convert_to_lora: adapter {adapter!r} was initialised by LoftQ, whose base is the quantized "
                         "weight (not the original minus a low-rank part): no plain LoRA for the original base equals it")
    held = [m.adapters[adapter] for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.adapters]
    changed = [changed_base(a) for a in held]
    if not any(changed):
        return peft
    if not all(changed):  # initialisers change every layer they run on, so this means a hand-built model
        raise ValueError(f"convert_to_lora: adapter {adapter!r} replaced the base of only some of its layers")
    f = math.sqrt(2) if peft.get("use_rslora") else 2  # alpha' / g(2r) == alpha / g(r)
    return {**peft, "init_lora_weights": True, "r": 2 * peft["r"], "lora_alpha": f * peft["lora_alpha"],
            "rank_pattern": {k: 2 * v for k, v in peft["rank_pattern"].items()},
            "alpha_pattern": {k: f * v for k, v in peft["alpha_pattern"].items()},
            LORAKIT_KEY: {**peft[LORAKIT_KEY], "base_fingerprint": None}}


def class_names(model: nn.Module) -> list[str] | None:
    """A classifier's class names in class order (``config.id2label``); None for transformers' ``LABEL_<i>``.

    They travel with the adapter: a head's row ``i`` means nothing without the name of class ``i``.
    """
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label or all(str(v) == f"LABEL_{k}" for k, v in id2label.items()):
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _atomic_write(target: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def base_fingerprint(model: nn.Module, paths: list[str]) -> str | None:
    """A short hash of the base weights under ``paths`` (strided sample); None on meta or merged weights."""
    h = hashlib.sha256()
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            if module.merged:
                return None
            module = module.base_layer
        w = module.weight
        if w.is_meta or not w.is_floating_point():
            return None
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{path}{tuple(w.shape)}{[round(v, 6) for v in sample.tolist()]}".encode())
    return h.hexdigest()[:16]


# ----- load ---------------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict, dict[str, Tensor]]:
    """Read and check an adapter directory: (config, raw config dict, tensors). Never unpickles."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    if not weights_file.is_file():
        extra = " (adapter_model.bin is a pickle and is never loaded)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}{extra}")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(raw).__name__}")
    try:
        config = LoraConfig.from_peft_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_file}: not a readable safetensors file: {e}") from None
    return config, raw, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> str:
    """Load an adapter checkpoint (lorakit's or PEFT's) into ``model`` as adapter ``adapter``.

    ``path`` is the adapter directory, or a directory holding ``<adapter>/``. Layers are injected if
    they are not there. Everything is validated before the model is touched: on any error the model
    is exactly as it was. The loaded adapter becomes active. Returns its name.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).exists() and adapter and (path / adapter / CONFIG_NAME).exists():
        path = path / adapter
    name = adapter or "default"
    config, raw, tensors = read_adapter(path)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    try:
        planned, copies = plan_adapter(model, config, name)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    targets = _load_targets(model, config, planned, copies)
    weights_file = path / WEIGHTS_NAME
    optional = {k for k in targets if k.endswith(".base_layer.weight")}
    missing = sorted(set(targets) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file}: keys do not match the model"
            + (f"; missing {len(missing)}: {missing[:5]}" if missing else "")
            + (f"; unexpected {len(unexpected)}: {unexpected[:5]}" if unexpected else "")
        )
    staged = []
    for key, (dest, transpose) in targets.items():
        if key not in tensors:
            continue
        t = tensors[key]
        t = t.T if transpose else t
        if tuple(t.shape) != tuple(dest.shape):
            found = tuple(tensors[key].shape)
            expected = tuple(dest.shape[::-1]) if transpose else tuple(dest.shape)
            raise CheckpointError(f"{weights_file}: tensor {key} has shape {found}, expected {expected}")
        if not t.is_floating_point():
            raise CheckpointError(f"{weights_file}: tensor {key} has dtype {t.dtype}, expected a floating dtype")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{weights_file}: tensor {key} has non-finite values (nan/inf)")
        staged.append((dest, t))
    expected_fp = (raw.get(LORAKIT_KEY) or {}).get("base_fingerprint")
    # ---- validated: from here on the model changes ----
    with torch.no_grad():
        for dest, t in staged:
            dest.copy_(t.to(dest.dtype))
    commit_adapter(model, name, planned, copies)
    if expected_fp:
        found_fp = base_fingerprint(model, [p.path for p in planned])
        if found_fp is not None and found_fp != expected_fp:
            warnings.warn(
                f"adapter {path} was trained on different base weights (fingerprint {expected_fp}, this model "
                f"{found_fp}); outputs will not match the ones it was trained for",
                UserWarning,
                stacklevel=2,
            )
    return name


def _load_targets(model, config, planned, copies) -> dict[str, tuple[Tensor, bool]]:
    """PEFT key -> (tensor to fill, whether the file stores it transposed)."""
    targets: dict[str, tuple[Tensor, bool]] = {}
    for p in planned:
        adapter = p.adapter
        if isinstance(p.layer, LoraEmbedding):
            targets[f"{PREFIX}{p.path}.lora_embedding_A"] = (adapter.lora_A.weight.data, True)
            targets[f"{PREFIX}{p.path}.lora_embedding_B"] = (adapter.lora_B.weight.data, False)
            # PEFT's save_embedding_layers also stores the (possibly resized) base table: optional
            targets[f"{PREFIX}{p.path}.base_layer.weight"] = (p.layer.base_layer.weight.data, False)
        else:
            targets[f"{PREFIX}{p.path}.lora_A.weight"] = (adapter.lora_A.weight.data, False)
            targets[f"{PREFIX}{p.path}.lora_B.weight"] = (adapter.lora_B.weight.data, False)
        for suffix, tensor in adapter.extra_tensors().items():
            targets[f"{PREFIX}{p.path}.{suffix}"] = (tensor.data, False)
        bias = getattr(p.layer.base_layer, "bias", None)
        if config.bias == "lora_only" and bias is not None:
            targets[f"{PREFIX}{p.path}.base_layer.bias"] = (bias.data, False)
    for path, module in copies.items():
        for k, v in module.state_dict().items():
            targets[f"{PREFIX}{path}.{k}"] = (v, False)
    if config.bias == "all":
        wrapped = {p.path: p.layer for p in planned if p.new_layer}
        for name, param in model.named_parameters():
            module_path = name.rpartition(".")[0]
            if not name.endswith("bias") or ".adapters." in name or _in_saved(model, name):
                continue
            if any(module_path == c or module_path.startswith(c + ".") for c in copies):
                continue  # saved in full with the modules_to_save copy
            key = f"{module_path}.base_layer.bias" if module_path in wrapped else name
            targets[PREFIX + key] = (param.data, False)
    return targets


