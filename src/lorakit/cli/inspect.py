"""``lorakit inspect ADAPTER``: config, parameter count, size on disk, per-layer rank and ||B·A||; for expert
stacks (``target_parameters``) the number of experts, their rank and each expert's ||B_e·A_e||·s."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from ..core.config import LORAKIT_KEY, module_matches
from ..variants.param_targets import Stack, parameter_stacks
from ..variants.tokens import LORA_KEY

HELP = "Describe an adapter checkpoint: config, size, per-layer rank and norm of the update."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def describe(path: str | Path) -> dict:
    """Everything ``inspect`` reports, as a dict (no model needed)."""
    path = Path(path)
    config, raw, tensors = read_adapter(path)
    a_keys = sorted(k for k in tensors if k.endswith(("lora_A.weight", "lora_embedding_A")))
    stems = {k: k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in a_keys}
    stacks = parameter_stacks(config, {stems[k]: tensors[k].shape[0] for k in a_keys})
    layers = []  # read_adapter ran check_adapter_tensors, as load_adapter does: A and B pair up, ranks match
    for key in a_keys:
        stem = key.rsplit(".lora_", 1)[0]
        b_key = f"{stem}.lora_embedding_B" if key.endswith("lora_embedding_A") else f"{stem}.lora_B.weight"
        A, B = tensors[key].float(), tensors[b_key].float()
        layers.append(_layer(stems[key], A, B, config, stacks.get(stems[key])))
    size = sum(f.stat().st_size for f in (path / CONFIG_NAME, path / WEIGHTS_NAME))
    meta = raw[LORAKIT_KEY]
    return {
        "path": str(path),
        "config": {k: raw.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "bias",
                                           "modules_to_save", "use_rslora", "use_dora", "init_lora_weights", "task_type",
                                           "base_model_name_or_path")},
        "base_quantization": raw[LORAKIT_KEY].get("quantization"),  # QLoRA: the 4/8-bit base it was trained on
        "parameters": sum(t.numel() for t in tensors.values()),
        "lora_parameters": sum(layer["params"] for layer in layers),
        "size_bytes": size,
        "layers": layers,
        "trainable_tokens": _token_rows(config, tensors, meta),
    }


def _layer(module: str, A: torch.Tensor, B: torch.Tensor, config, stack: Stack | None) -> dict:
    """One pair's row. An expert stack (``target_parameters``: A ``(E*r, in)``, B ``(out, r*E)``, PEFT's
    layout) gets its parameter, expert count, rank and the norm of each expert's update ``s·B[e]·A[e]``;
    ``stack``: from :func:`~lorakit.variants.param_targets.parameter_stacks`, which reads
    ``rank_pattern`` / ``alpha_pattern`` by parameter path (as PEFT keys them)."""
    row = {"module": module, "rank": A.shape[0], "scaling": config.scaling(module), "params": A.numel() + B.numel()}
    if stack is None and config.target_parameters and A.shape[0] % config.r == 0:  # "all-experts": the config's r
        stack = Stack(None, config.r, A.shape[0] // config.r, row["scaling"])
    if stack is not None and stack.experts == 1:  # a 2-D parameter: one plain pair, at its parameter's r and alpha
        row = {**row, "parameter": stack.parameter, "rank": stack.rank, "scaling": stack.scaling}
    elif stack is not None and A.dim() == 2:
        r, E, scaling = stack.rank, stack.experts, stack.scaling
        A_e, B_e = A.view(E, r, -1), B.view(B.shape[0], r, E).permute(2, 0, 1)  # (E, r, in), (E, out, r)
        norms = torch.linalg.matrix_norm(torch.bmm(B_e, A_e)) * scaling
        return {**row, "parameter": stack.parameter, "rank": r, "scaling": scaling, "experts": E,
                "expert_norms": norms.tolist(), "delta_norm": norms.pow(2).sum().sqrt().item()}
    return {**row, "delta_norm": torch.linalg.matrix_norm(B.flatten(1) @ A.flatten(1)).item() * row["scaling"]}


def _token_rows(config, tensors: dict, meta: dict) -> list[dict]:
    """Per layer with trainable tokens: its path, the trained ids, how many rows, ||rows||, and the tokens the
    adapter added to the tokenizer (``lorakit train --add-tokens``)."""
    spec = config.trainable_token_indices
    out = []
    for key in sorted(k for k in tensors if k.endswith("." + LORA_KEY)):
        module = key.removeprefix("base_model.model.").removesuffix("." + LORA_KEY)
        ids = spec if isinstance(spec, list) else next((v for k, v in (spec or {}).items() if module_matches(module, k)),
                                                       None)
        out.append({"module": module, "ids": ids, "rows": tensors[key].shape[0],
                    "norm": torch.linalg.matrix_norm(tensors[key].float()).item(),
                    "added_tokens": meta.get("added_tokens"), "vocab_size": meta.get("vocab_size")})
    return out


def run(args: argparse.Namespace) -> int:
    info = describe(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter      {info['path']}")
    for k, v in info["config"].items():
        print(f"{k:<12} {v}")
    if info["base_quantization"]:
        print(f"trained on   a base quantized to {info['base_quantization']} (eval, generate and serve rebuild it; "
              "merge uses full precision)")
    print(f"parameters   {info['parameters']:,} ({info['lora_parameters']:,} in LoRA A/B)")
    print(f"size         {info['size_bytes'] / 1024:.1f} KiB")
    width = max((len(layer["module"]) for layer in info["layers"]), default=6)
    print(f"\n{'module':<{width}}  rank  scaling   ||B·A||·s")
    for layer in info["layers"]:
        print(f"{layer['module']:<{width}}  {layer['rank']:>4}  {layer['scaling']:>7.3f}  {layer['delta_norm']:>10.4g}")
        if "experts" in layer:  # one rank-r update per expert: its norm
            norms = " ".join(f"{n:.3g}" for n in layer["expert_norms"])
            what = f"{layer['parameter']}: " if layer["parameter"] else ""
            print(f"{'':<{width}}  {what}{layer['experts']} experts x rank {layer['rank']}, ||B_e·A_e||·s: {norms}")
    for t in info["trainable_tokens"]:
        added = f", added to the tokenizer: {', '.join(t['added_tokens'])}" if t["added_tokens"] else ""
        print(f"\ntrainable tokens  {t['module']}: {t['rows']} rows, ids {t['ids']}, ||rows|| {t['norm']:.4g}, "
              f"vocabulary {t['vocab_size']}{added}")
    return 0
