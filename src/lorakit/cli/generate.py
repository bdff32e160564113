"""``lorakit generate``: text generation with an adapter, or a different adapter per prompt in one batch."""

from __future__ import annotations

import argparse
from contextlib import nullcontext

from .options import add_base_quantize, positive_float, positive_int

HELP = "Generate text with a causal LM and one or more adapters (optionally a different adapter per prompt)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base causal LM (default: the first adapter's base_model_name_or_path)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter to load (repeatable); NAME defaults to the directory name")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--row-adapters", metavar="NAME,NAME,...",
                   help="adapter for each prompt, in order ('none' = base model); default: the last adapter for all")
    p.add_argument("--prompt-format", choices=["raw", "sft", "e2e"],
                   help="how a prompt becomes tokens: raw text; sft: the instruction format or chat template the "
                   "adapter was trained with (the prompt as the user turn); e2e: an E2E meaning representation + "
                   "separator. Default: the task of the `lorakit train` run of the first adapter, else raw")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--num-beams", type=positive_int, default=1)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_base_quantize(p)


def _parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    from pathlib import Path

    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name.replace(".", "_") or "default", spec
        out.append((name, path))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.checkpoint import load_adapter, read_adapter
    from ..core.config import LORAKIT_KEY
    from ..models import base_quantization_for, load_model, load_tokenizer, quantize_base, rebuild_vocabulary
    from ..ops.per_row import per_row_adapters
    from ..train.evaluate import generate_texts

    adapters = _parse_adapters(args.adapter)
    prompt_format = args.prompt_format or _trained_format(adapters)
    base = args.model or (read_adapter(adapters[0][1])[0].base_model_name_or_path if adapters else None)
    if not base:
        raise ValueError("pass --model (or an --adapter whose config names its base model)")
    recorded = {path: read_adapter(path)[1][LORAKIT_KEY].get("quantization")
                for _, path in (adapters if not args.quantize else ())}
    quantization = base_quantization_for(recorded, args.quantize or "auto")
    torch.manual_seed(args.seed)
    model = load_model(base, "sft").eval()
    tokenizer = load_tokenizer(base)
    rebuild_vocabulary(model, tokenizer, {name: read_adapter(path)[1][LORAKIT_KEY] for name, path in adapters})
    for name, path in adapters:
        load_adapter(model, path, adapter=name)
    quantize_base(model, quantization)
    names = [n for n, _ in adapters]
    if args.row_adapters:
        rows = [None if n.strip().lower() == "none" else n.strip() for n in args.row_adapters.split(",")]
        if len(rows) != len(args.prompt):
            raise ValueError(f"--row-adapters names {len(rows)} adapters for {len(args.prompt)} prompts")
        unknown = sorted({n for n in rows if n is not None and n not in names})
        if unknown:
            raise ValueError(f"--row-adapters: unknown adapter {unknown}; loaded: {names}")
        # generate() repeats each prompt num_beams times, consecutively
        context = per_row_adapters(model, [n for n in rows for _ in range(args.num_beams)])
    else:
        context = nullcontext()
    prompts = [_prompt_ids(p, tokenizer, prompt_format) for p in args.prompt]
    decoding = {"num_beams": args.num_beams, "do_sample": args.do_sample}
    if args.do_sample:
        decoding["temperature"] = args.temperature
    with context:
        texts = generate_texts(model, tokenizer, prompts, args.max_new_tokens, batch_size=len(prompts), **decoding)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{' ' if text and not prompt.endswith(' ') else ''}{text}")
    return 0


def _trained_format(adapters: list[tuple[str, str]]) -> str:
    """The prompt format of the ``lorakit train`` run that wrote the first adapter (raw if unknown)."""
    from pathlib import Path

    from .train import read_run_args

    task = read_run_args(Path(adapters[0][1])).get("task") if adapters else None
    return task if task in ("sft", "e2e") else "raw"


def _prompt_ids(text: str, tokenizer, prompt_format: str) -> list[int]:
    from ..train.tasks import e2e_prompt_ids, sft_prompt_ids

    if prompt_format == "sft":
        return sft_prompt_ids({"prompt": text, "response": ""}, tokenizer)
    if prompt_format == "e2e":
        return e2e_prompt_ids(text, tokenizer)
    return tokenizer(text)["input_ids"]
