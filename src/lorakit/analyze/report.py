"""Section 7's analyses on adapter checkpoints: what ``lorakit analyze`` computes, as plain dicts (JSON-ready).

    report = analyze_adapter("runs/r8/adapter", base=model)        # spectrum, effective rank, amplification
    pair = compare_adapters("runs/r8/adapter", "runs/r64/adapter")  # φ heatmaps per common module

Works on any checkpoint ``lorakit.save_adapter`` (or PEFT) writes: linear and GPT-2 ``Conv1D`` layers, fused
projections adapted on slices (saved as plain LoRA with a block-structured B), embeddings and convolutions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.checkpoint import PREFIX, read_adapter
from ..core.layers import LoraLinear, lora_layer_type
from ..layers import LoraConv, LoraEmbedding
from . import measures as M


@dataclass
class Update:
    """One adapted module of a checkpoint: its factors and scaling (``ΔW = scaling · B·A``, ``(out, in)``)."""

    module: str
    A: Tensor
    B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        return M.delta_weight(self.A, self.B, self.scaling)


def read_updates(path: str | Path) -> dict[str, Update]:
    """The LoRA factors of an adapter directory, by module path; errors name the adapter and the module."""
    config, _, tensors = read_adapter(path)
    updates: dict[str, Update] = {}
    for key in sorted(tensors, key=_natural):  # layer.2 before layer.10
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if not key.endswith(a_suffix):
                continue
            stem = key[: -len(a_suffix)]
            module = stem.removeprefix(PREFIX)
            B = tensors.get(stem + b_suffix)
            if B is None:
                raise ValueError(f"adapter {path}: {key} has no matching {stem + b_suffix}")
            A = tensors[key]
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise ValueError(f"adapter {path}: module {module} has non-finite LoRA weights")
            if A.shape[0] != B.shape[1]:
                raise ValueError(f"adapter {path}: module {module}: A has rank {A.shape[0]}, B has {B.shape[1]} columns")
            updates[module] = Update(module, A, B, config.scaling(module))
    if not updates:
        raise ValueError(f"adapter {path} holds no LoRA weights (no lora_A / lora_embedding_A tensors)")
    return updates


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def base_matrix(module: nn.Module) -> Tensor:
    """The base weight of ``module`` in ΔW's ``(out, in)`` layout (GPT-2 ``Conv1D`` and embeddings transposed,
    conv kernels flattened), as the layer types (:mod:`lorakit.core.layers`, :mod:`lorakit.layers`) define them."""
    kind = lora_layer_type(module)
    w = module.weight.detach()
    if kind is LoraLinear:
        return w if isinstance(module, nn.Linear) else w.T
    if kind is LoraEmbedding:
        return w.T
    if kind is LoraConv:
        return w.flatten(1)
    raise ValueError(f"{type(module).__name__} is not a layer type LoRA adapts")


def analyze_adapter(path: str | Path, base: nn.Module | None = None, *, energy: float = 0.9) -> dict:
    """Per adapted module: rank, ``||ΔW||_F``, singular values, effective rank, ``energy`` rank; with ``base``
    (the model the adapter was trained on, without the adapter) also the amplification measures of Table 7."""
    modules = dict(base.named_modules()) if base is not None else {}
    layers = []
    for name, up in read_updates(path).items():
        delta = up.delta()
        s = M.singular_values(delta)
        row = {"module": name, "rank": up.rank, "scaling": up.scaling, "shape": list(delta.shape),
               "delta_norm": float(s.pow(2).sum().sqrt()), "singular_values": s[: up.rank].tolist(),
               "effective_rank": M.effective_rank(s), "energy_rank": M.energy_rank(s, energy)}
        if base is not None:
            if name not in modules:
                raise ValueError(f"adapter {path}: module {name} is not in the base model")
            w0 = base_matrix(modules[name])
            if w0.shape != delta.shape:
                raise ValueError(f"adapter {path}: module {name}: ΔW is {tuple(delta.shape)} but the base weight is "
                                 f"{tuple(w0.shape)} (another base model?)")
            row["amplification"] = M.amplification(delta, w0, up.rank)
        layers.append(row)
    # DoRA: the measures are of the low-rank part s·B·A, not of the magnitude-rescaled weight
    return {"path": str(path), "energy_fraction": energy, "use_dora": read_adapter(path)[0].use_dora,
            "layers": layers}


def compare_adapters(path1: str | Path, path2: str | Path) -> dict:
    """``φ(A1, A2, i, j)`` for every module adapted in both (right-singular vectors of A, as Figure 3), with
    the chance level of random subspaces; summary: ``phi_top`` = φ(1, 1) and ``phi_mean`` over all (i, j).
    ``phi_delta_out*``: the same for the top-r left-singular vectors of the two ΔW (their output subspaces)."""
    u1, u2 = read_updates(path1), read_updates(path2)
    common = [m for m in u1 if m in u2]
    if not common:
        raise ValueError(f"adapters {path1} and {path2} adapt no module in common")
    layers = []
    for name in common:
        a1, a2 = u1[name].A.flatten(1), u2[name].A.flatten(1)
        if a1.shape[1] != a2.shape[1]:
            raise ValueError(f"module {name}: A has {a1.shape[1]} input features in {path1} but {a2.shape[1]} in "
                             f"{path2} (another base model?)")
        phi = M.subspace_similarity(M.right_singular_basis(a1), M.right_singular_basis(a2))
        chance = M.random_similarity(*phi.shape, a1.shape[1])
        # the same on ΔW's output side (left-singular vectors): B starts at zero, so this side is all learned
        d1, d2 = u1[name].delta(), u2[name].delta()
        phi_out = M.subspace_similarity(M.left_singular_basis(d1, u1[name].rank), M.left_singular_basis(d2, u2[name].rank))
        layers.append({"module": name, "r1": phi.shape[0], "r2": phi.shape[1], "phi": phi.tolist(),
                       "phi_top": phi[0, 0].item(), "phi_mean": phi.mean().item(),
                       "chance_mean": chance.mean().item(), "phi_delta_out": phi_out.tolist(),
                       "phi_delta_out_top": phi_out[0, 0].item(), "phi_delta_out_mean": phi_out.mean().item(),
                       "chance_out_mean": M.random_similarity(*phi_out.shape, d1.shape[0]).mean().item()})
    return {"paths": [str(path1), str(path2)], "layers": layers}


def summary_rows(report: dict, pair: dict | None = None) -> list[dict]:
    """One flat row per module for the terminal table (what ``lorakit analyze`` prints)."""
    phis = {row["module"]: row for row in (pair or {}).get("layers", [])}
    rows = []
    for row in report["layers"]:
        amp = row.get("amplification") or {}
        phi = phis.get(row["module"], {})
        rows.append({"module": row["module"], "r": row["rank"], "norm": row["delta_norm"],
                     "eff_rank": row["effective_rank"], "energy_rank": row["energy_rank"],
                     "amp": amp.get("amplification", math.nan), "amp_random": amp.get("amplification_random", math.nan),
                     "phi_top": phi.get("phi_top", math.nan), "phi_mean": phi.get("phi_mean", math.nan),
                     "phi_out_top": phi.get("phi_delta_out_top", math.nan)})
    return rows


def load_base(adapter: str | Path, model: str | None = None) -> nn.Module | None:
    """The plain base model of ``adapter`` (``model``, else the one its config names); None when no model is
    given and the named one is not a local directory (amplification is then left out)."""
    from ..models import load_model, num_labels_in, task_for_adapter

    config, _, tensors = read_adapter(adapter)
    base = model or config.base_model_name_or_path
    if model is None and not (base and Path(base).expanduser().is_dir()):
        return None
    return load_model(base, task_for_adapter(config.task_type), num_labels=num_labels_in(tensors)).eval()


def run_analysis(adapters: list[str | Path], model: str | None = None, output_dir: str | Path | None = None,
                 *, figures: bool = True) -> dict:
    """Everything ``lorakit analyze`` reports for one or two adapters; with ``output_dir`` also writes
    ``analysis.json`` and the PNG figures there (their paths are listed under ``"files"``)."""
    if not 1 <= len(adapters) <= 2:
        raise ValueError(f"analyze takes one or two adapters, got {len(adapters)}")
    if output_dir is not None and figures:
        from .figures import _pyplot

        _pyplot()  # a missing matplotlib is reported before any work or write
    for a in adapters:
        read_updates(a)  # every adapter is checked before the (slow) base model is loaded
    similarity = compare_adapters(*adapters) if len(adapters) == 2 else None
    base = load_base(adapters[0], model)  # both adapters are measured against the first one's base
    result: dict = {"base_model": model or (read_adapter(adapters[0])[0].base_model_name_or_path if base else None),
                    "adapters": [analyze_adapter(a, base) for a in adapters], "similarity": similarity}
    if output_dir is not None:
        result["files"] = _write(result, Path(output_dir), figures)
    return result


def _write(result: dict, out: Path, figures: bool) -> list[str]:
    import json
    import os

    from . import figures as F

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "analysis.json"]
    if figures:
        for k, report in enumerate(result["adapters"], 1):
            files.append(F.plot_spectra(report, out / f"spectrum_{k}.png"))
            if any("amplification" in row for row in report["layers"]):
                files.append(F.plot_amplification(report, out / f"amplification_{k}.png"))
        if result["similarity"]:
            files.append(F.plot_similarity(result["similarity"], out / "similarity.png"))
            files.append(F.plot_similarity(result["similarity"], out / "similarity_zoom.png", zoom=8))
            files.append(F.plot_similarity(result["similarity"], out / "similarity_delta_out.png", key="phi_delta_out"))
    names = [str(f) for f in files]
    tmp = out / ".analysis.json.tmp"
    tmp.write_text(json.dumps({**result, "files": names}))
    os.replace(tmp, files[0])
    return names
