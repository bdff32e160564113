"""``lorakit serve`` and its adapter pool, side by side on CPU (one process, rotating repetitions).

    python benchmarks/bench_serve.py --case compose          # per_row_adapters vs the resident pool (~1 min)
    python benchmarks/bench_serve.py --case serve            # HTTP throughput / latency, mixed vs one vs swap
    python benchmarks/bench_serve.py --case decode_ratio     # per-row / one shared adapter at small models

Models are random-init LLaMA configs (nothing is downloaded). Every timing is the best (``compose``,
``decode_ratio``) of ``--reps`` repetitions in rotating order, so drift in machine speed hits all variants
alike; the machine is shared and interference only adds time. Figures in docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lorakit

THREADS = 2


def llama(hidden: int, layers: int, vocab: int = 1000, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(hidden // 64, 2)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=hidden * 2 + hidden // 2, vocab_size=vocab,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def add_adapters(model, n: int, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    names = [f"a{i}" for i in range(n)]
    g = torch.Generator().manual_seed(1)
    for name in names:
        lorakit.add_lora(model, lorakit.LoraConfig(r=r, alpha=16, target_modules=list(targets)), adapter=name)
    with torch.no_grad():
        for layer in lorakit.core.model.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.01)
    return names


def rotate(variants: dict, reps: int) -> dict[str, float]:
    """Best time (s) of each variant over ``reps`` rotating rounds."""
    keys = list(variants)
    times = {k: [] for k in keys}
    for rep in range(reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            t = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


# ----- compose: entering a batch composition -------------------------------------------------------------
def case_compose(reps: int) -> dict:
    """The issue's shape: 4-layer 256-wide LLaMA, 32 adapters, 32 prompts x 16 tokens."""
    from lorakit.ops.pool import AdapterPool

    model = llama(256, 4)
    names = add_adapters(model, 32)
    pool = AdapterPool(model, slots=32)
    for name in names:
        pool.add(name)
    ids = torch.randint(1, 1000, (32, 16), generator=torch.Generator().manual_seed(0))
    rows = names  # one adapter per row
    shuffled = names[1:] + names[:1]  # another composition of the same adapters

    splits: dict[str, list[float]] = {}

    def timed(label: str, enter):
        """enter the composition, then two forwards; each phase timed on its own."""
        def run():
            with torch.inference_mode():
                t0 = time.perf_counter()
                with enter():
                    t1 = time.perf_counter()
                    model(input_ids=ids)
                    t2 = time.perf_counter()
                    model(input_ids=ids)
                    t3 = time.perf_counter()
            for phase, dt in (("enter", t1 - t0), ("1st forward", t2 - t1), ("2nd forward", t3 - t2)):
                splits.setdefault(f"{label} {phase}", []).append(dt)
        return run

    rotate({"per_row": timed("per_row_adapters", lambda: lorakit.per_row_adapters(model, rows)),
            "pool": timed("pool.rows", lambda: pool.rows(shuffled)),
            "shared": timed("one shared adapter", lambda: lorakit.use_adapter(model, names[0]))}, reps)
    best = {k: min(v) for k, v in splits.items()}
    return {k: round(v * 1000, 2) for k, v in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=["compose", "serve", "decode_ratio"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    results = {}
    for case in args.case or ["compose", "decode_ratio", "serve"]:
        results[case] = CASES[case](args.reps)
        print(json.dumps({case: results[case]}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


CASES = {"compose": case_compose}

if __name__ == "__main__":
    sys.exit(main())
