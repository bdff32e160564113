"""``lorakit merge ADAPTER --out DIR``: a merged model directory in transformers format (safetensors)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..core.checkpoint import read_adapter
from ..core.model import unload
from ..files import temp_name
from ..models import load_with_adapter
from .options import check_output_dir

HELP = "Merge an adapter into its base model and save a plain transformers model (no lorakit needed to load it)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--model", help="base model path or hub id (default: the adapter's base_model_name_or_path)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out, "--out")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} exists and is not empty; pass --force to replace it")
    _check_inputs_outside(out, args.adapter, args.model)
    model, tokenizer, _ = load_with_adapter(args.adapter, args.model, quantize=None)  # full precision, always
    merged = unload(model, merge=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_name(out))
    tmp.mkdir()  # 0777 less the umask, as the merged model's directory should be (mkdtemp's is 0700)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # the merged model appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model written to {out}")
    return 0


def _check_inputs_outside(out: Path, adapter: str, model: str | None) -> None:
    """``out`` (replaced whole) holds neither the adapter nor a local base model: ``--force`` would delete
    what the merge reads."""
    base = model or read_adapter(adapter)[0].base_model_name_or_path
    inputs = [(Path(adapter), "the adapter to merge")]
    if base and Path(base).expanduser().exists():
        inputs.append((Path(base).expanduser(), "the base model"))
    for path, what in inputs:
        if out.resolve() in (path.resolve(), *path.resolve().parents):
            raise ValueError(f"--out {out} holds {what} ({path}); pick another directory")
