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
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ..files import atomic_write, save_tensors
from .config import LORAKIT_KEY, LoraConfig, short_repr
from .layers import LoraLayer
from .model import adapter_config, adapter_names, commit_adapter, holding, plan_adapter
from .saved import SavedModule
from .tables import (
    CONVERSIONS,
    EXPORT_METADATA,
    FIT_NEW,
    LOAD_CHECKS,
    METADATA,
    PEFT_TARGETS,
    PEFT_TYPES,
    PEFT_WRITERS,
    TENSOR_CHECKS,
)
from .targets import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key and expected vs found."""


# ----- state dict -------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, adapter: str = "default", convert_to_lora: bool = False) -> dict[str, Tensor]:
    """The tensors of adapter ``adapter`` under PEFT's checkpoint keys (detached, in model dtype).

    ``convert_to_lora``: layers whose base weight an initialiser replaced (PiSSA, OLoRA...) get the exactly
    equivalent plain LoRA for the original base instead (rank 2r; :data:`~lorakit.core.tables.CONVERSIONS`).
    """
    config = adapter_config(model, adapter)
    out: dict[str, Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.adapters:
            tensors = module.file_tensors(module.adapters[adapter])  # the layer and the adapter say what
            out.update({f"{path}.{k}": v for k, v in tensors.items()})
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                out[f"{path}.base_layer.bias"] = bias
        elif isinstance(module, SavedModule) and adapter in module.copies:
            out.update({f"{path}.{k}": v for k, v in module.copies[adapter].state_dict().items()})
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".adapters." not in name and not _in_saved(model, name):
                out[name] = p
    out = {PREFIX + k: v.detach() for k, v in out.items()}
    for convert in CONVERSIONS if convert_to_lora else []:
        out, _, _ = convert(model, adapter, out, None, None)
    return out


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
    tensors = lora_state_dict(model, adapter)
    peft, meta = _peft_config(model, config, adapter)
    for convert in CONVERSIONS if convert_to_lora else []:
        tensors, peft, meta = convert(model, adapter, tensors, peft, meta)
    tensors = {k: v.contiguous().cpu().clone() for k, v in tensors.items()}
    for write_as in PEFT_WRITERS:  # another PEFT format where it applies (trainable tokens alone)
        if (converted := write_as(peft, tensors)) is not None:
            peft, tensors = converted
    header = {"format": "pt", LORAKIT_KEY: json.dumps(meta, sort_keys=True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_tensors(tensors, tmp, metadata=header))
    atomic_write(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft, indent=2, sort_keys=True)))
    return out_dir


def _peft_config(model: nn.Module, config: LoraConfig, adapter: str) -> tuple[dict, dict]:
    """(``adapter_config.json``: PEFT's schema only, lorakit's metadata for the weights file's header).

    The metadata (base fingerprint, fused slices, class names) sits in the safetensors header's
    ``__metadata__`` under ``"lorakit"``, where PEFT and vLLM do not look (PEFT warns about unknown config keys).
    """
    held = holding(model, adapter)
    hashed = _fingerprinted(model, adapter)  # what a load fingerprints
    d = config.to_peft_dict()
    named = set()  # layers another field names (target_parameters)
    for write_targets in PEFT_TARGETS:
        named |= write_targets(model, config, held, d)
    paths = [p for p in hashed if p not in named]  # modules (target_modules)
    # Name targets by their last component when that selects exactly the adapted modules (vLLM reads these).
    leaves = sorted({p.split(".")[-1] for p in paths})
    d["fan_in_fan_out"] = any(getattr(m, "fan_in_fan_out", False) for _, m in held)
    d["target_modules"] = leaves if paths and find_targets(model, config.replace(target_modules=leaves)) == paths \
        else paths
    for p in paths:  # an adapter exported as another pair (fused slices, AdaLoRA) names its rank and alpha
        pattern = model.get_submodule(p).adapters[adapter].export_pattern(config.alpha_for(p))
        if pattern is not None:
            d["rank_pattern"] = {**d["rank_pattern"], p: pattern[0]}
            d["alpha_pattern"] = {**d["alpha_pattern"], p: pattern[1]}
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    meta = {"base_fingerprint": base_fingerprint(model, hashed), "slices": config.slices}
    for export in EXPORT_METADATA:  # what the model says besides (class names, a QLoRA base's quantization)
        meta.update(export(model, held))
    for _, m in held:  # what an adapter needs recorded besides its tensors (trainable tokens: the vocabulary)
        meta.update(getattr(m.adapters[adapter], "export_metadata", dict)())
    return d, meta


def _fingerprinted(model: nn.Module, adapter: str) -> list[str]:
    """The paths a base fingerprint hashes, in model order: the LoRA targets of ``adapter`` (parameters too)."""
    return [p for p, m in holding(model, adapter) if m.lora_target]


def base_fingerprint(model: nn.Module, paths: list[str]) -> str | None:
    """A short hash of the base weights under ``paths`` (strided sample); None on meta or merged weights."""
    h = hashlib.sha256()
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer) and module.merged:
            return None
        w = module.weight  # a LoRA layer's: its base weight
        if w.is_meta or not w.is_floating_point():
            return None
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{path}{tuple(w.shape)}{[round(v, 6) for v in sample.tolist()]}".encode())
    return h.hexdigest()[:16]


# ----- load ---------------------------------------------------------------------------------------------
def check_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` is a directory holding both adapter files (a cheap check before any loading); else a
    FileNotFoundError saying what is there instead."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} {'is a file' if path.exists() else 'does not exist'}")
    if not config_file.is_file():
        inside = sorted(p.parent.name + "/" for p in path.glob(f"*/{CONFIG_NAME}"))
        hint = f" (adapters in its subfolders: {', '.join(inside[:5])})" if inside else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}{hint}")
    if not weights_file.is_file():
        extra = " (adapter_model.bin is a pickle and is never loaded)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}{extra}")
    return path


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict, dict[str, Tensor]]:
    """Read and check an adapter directory: (config, raw config dict, tensors). Never unpickles.

    The raw dict is ``adapter_config.json`` as read, plus lorakit's validated metadata under ``"lorakit"``
    (from the weights file's header; checkpoints written before it moved there keep it in the JSON).
    Every problem is a one-line :class:`CheckpointError` naming the file and what is wrong.
    """
    path = check_adapter_dir(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON: {_one_line(e)}") from None
    except RecursionError:
        raise CheckpointError(f"{config_file}: JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(raw).__name__}")
    peft_type = raw.get("peft_type")  # another type (AdaLoRA) is read as the exactly equivalent plain LoRA
    convert = PEFT_TYPES.get(peft_type) if isinstance(peft_type, str) else None
    try:
        config = None if convert else LoraConfig.from_peft_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {_one_line(e)}") from None
    except RecursionError:
        raise CheckpointError(f"{config_file}: a value is nested too deeply") from None
    try:
        with safe_open(weights_file, "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_file}: not a readable safetensors file: {_one_line(e)}") from None
    if convert:
        try:
            raw, tensors = convert(raw, tensors)
            config = LoraConfig.from_peft_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file}: {_one_line(e)}") from None
    meta = _check_metadata(raw.get(LORAKIT_KEY, {}), f"{config_file}: {LORAKIT_KEY!r}")  # old place, still read
    if LORAKIT_KEY in header:
        try:
            meta = json.loads(header[LORAKIT_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{weights_file}: header metadata {LORAKIT_KEY!r} is not valid JSON") from None
        meta = _check_metadata(meta, f"{weights_file}: header metadata {LORAKIT_KEY!r}")
    check_adapter_tensors(config, tensors, weights_file)
    return config, {**raw, LORAKIT_KEY: meta}, tensors


def check_adapter_tensors(config: LoraConfig, tensors: dict[str, Tensor], weights_file: Path) -> None:
    """What an adapter's tensors must satisfy whatever model they go into (``read_adapter`` runs it, so every
    reader, ``load_adapter`` and ``lorakit inspect`` alike, refuses the same files): each ``lora_A`` has its
    ``lora_B`` and the pair has the rank ``adapter_config.json`` gives that module (unless a check of
    :data:`~lorakit.core.tables.TENSOR_CHECKS` vouches for it: expert stacks), and every such check holds
    (DoRA's magnitudes). A :class:`CheckpointError` naming the key otherwise."""
    for key in tensors:
        if key.endswith(("lora_B.weight", "lora_embedding_B")):
            a_key = key.removesuffix("B.weight") + "A.weight" if key.endswith(".weight") else key[:-1] + "A"
            if a_key not in tensors:
                raise CheckpointError(f"{weights_file}: {key} has no matching {a_key}")
    vouched = set().union(*(check(config, tensors, weights_file) for check in TENSOR_CHECKS))
    for key in sorted(k for k in tensors if k.endswith(("lora_A.weight", "lora_embedding_A"))):
        stem = key.rsplit(".lora_", 1)[0]
        b_key = f"{stem}.lora_embedding_B" if key.endswith("lora_embedding_A") else f"{stem}.lora_B.weight"
        if b_key not in tensors:
            raise CheckpointError(f"{weights_file}: {key} has no matching {b_key}")
        A, B = tensors[key], tensors[b_key]
        if A.dim() < 2 or B.dim() < 2 or B.shape[1] != A.shape[0]:
            raise CheckpointError(f"{weights_file}: {key} {tuple(A.shape)} and {b_key} {tuple(B.shape)} are not a "
                                  "rank-r pair (A: (r, in, ...), B: (out, r, ...))")
        module = stem.removeprefix(PREFIX)
        r = config.rank_for(module)
        if A.shape[0] != r and key not in vouched:
            raise CheckpointError(f"{weights_file}: tensor {key} has shape {tuple(A.shape)}, but {CONFIG_NAME} gives "
                                  f"rank {r} for {module}")


# lorakit's metadata: key -> check of its value (an allow-list, like PEFT_KEYS for the config; variants add
# theirs to core.tables.METADATA)
_METADATA = {
    "base_fingerprint": lambda v: v is None or isinstance(v, str),
    "slices": lambda v: isinstance(v, dict),  # informational: fused slices are saved as the equivalent plain LoRA
}


def _check_metadata(meta: object, where: str) -> dict:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} must be an object, found {type(meta).__name__}")
    checks = {**_METADATA, **METADATA}
    for key, value in meta.items():
        if key not in checks:
            raise CheckpointError(f"{where}: unknown key {key!r}")
        if not checks[key](value):
            raise CheckpointError(f"{where}: {key} has an invalid value {short_repr(value)}")
    return meta


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> str:
    """Load an adapter checkpoint (lorakit's or PEFT's) into ``model`` as adapter ``adapter``.

    ``path`` is the adapter directory, or a directory holding ``<adapter>/``. Layers are injected if
    they are not there. Everything is validated before the model is touched: every rank is compared with
    the file's tensors before anything is allocated, every value is checked finite after the cast to the
    model's dtype, and on any error the model is exactly as it was. New modules take the train/eval mode
    of the layers they wrap. The loaded adapter becomes active. Returns its name.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).exists() and adapter and (path / adapter / CONFIG_NAME).exists():
        path = path / adapter
    name = adapter or "default"
    config, raw, tensors = read_adapter(path)
    weights_file = path / WEIGHTS_NAME
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    try:
        _check_ranks(config, tensors, find_targets(model, config) if config.target_modules != [] else [], weights_file)
        for check in LOAD_CHECKS:  # a variant's tensors before anything is allocated (targeted parameters)
            check(model, config, tensors, weights_file)
        planned, copies = plan_adapter(model, config, name)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for fit in FIT_NEW:  # new modules shaped to the file first (a head with its own number of classes)
        fit(model, planned, copies, tensors)
    staged = _stage(_load_targets(model, config, planned, copies), tensors, weights_file)
    expected_fp = raw[LORAKIT_KEY].get("base_fingerprint")
    # ---- validated: from here on the model changes ----
    with torch.no_grad():
        for dest, t in staged:
            dest.copy_(t)
    commit_adapter(model, name, planned, copies)
    if expected_fp:
        found_fp = base_fingerprint(model, _fingerprinted(model, name))
        if found_fp is not None and found_fp != expected_fp:
            warnings.warn(
                f"adapter {path} was trained on different base weights (fingerprint {expected_fp}, this model "
                f"{found_fp}); outputs will not match the ones it was trained for",
                UserWarning,
                stacklevel=2,
            )
    return name


def _stage(targets: dict[str, tuple[Tensor, bool]], tensors: dict[str, Tensor], weights_file: Path) -> list:
    """``(destination, tensor)`` for every key of the file, each checked against its destination: the keys match
    (suffixes ``.base_layer.weight`` are optional), and each tensor has the destination's shape (transposed
    where the file stores it so), a floating dtype and finite values once cast to the destination's dtype."""
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
        t = t.to(dest.dtype)  # checked in the dtype it will have: a finite 1e6 is inf in fp16
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{weights_file}: tensor {key} has non-finite values (nan/inf) in {dest.dtype}")
        staged.append((dest, t))
    return staged


def _check_ranks(config: LoraConfig, tensors: dict[str, Tensor], paths: list[str], weights_file: Path) -> None:
    """Each target has an A in the file (whose rank :func:`check_adapter_tensors` compared with the config's):
    checked before any adapter is allocated (a config saying ``r: 1000000000000`` must not allocate terabytes
    before the shapes are compared)."""
    for path in paths:
        if not any(k in tensors for k in (f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_embedding_A")):
            raise CheckpointError(f"{weights_file}: no lora_A tensor for target {path} "
                                  f"(expected key {PREFIX}{path}.lora_A.weight)")


def _load_targets(model, config, planned, copies) -> dict[str, tuple[Tensor, bool]]:
    """PEFT key -> (tensor to fill, whether the file stores it transposed)."""
    targets: dict[str, tuple[Tensor, bool]] = {}
    for p in planned:
        for suffix, slot in p.layer.file_slots(p.adapter).items():
            targets[f"{PREFIX}{p.path}.{suffix}"] = slot
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


