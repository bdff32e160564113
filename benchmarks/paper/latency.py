"""Inference latency of one forward pass on a GPT-2 medium config (Table 1 analog), on CPU.

    python benchmarks/paper/latency.py                          # batch 1 x seq 128 and batch 1 x seq 32
    python benchmarks/paper/latency.py --shapes 1x128:5 16x128:2 32x128:2 16x256:1 --threads 1

Variants on one random-init GPT-2 medium (24 x 1024, weights shared): ``base``; ``lora-merged`` (r=4 on q,v of
``c_attn``, ``lorakit.merge``); ``lora-unmerged`` (the same adapter applied on the side); ``adapter`` (a Houlsby
bottleneck of size 16 after each block's attention and FFN output, like the paper's AdapterH). All in one
process, in rotating order per repetition (drift hits every variant alike); the best of the repetitions, since a
shared machine only ever adds time. ``BxS:R`` gives a shape its own number of repetitions (big shapes cost
minutes per forward pass on one CPU thread); a shape also runs one uncounted warm-up round first, unless it has
a single repetition (a forward pass of minutes is not dominated by first-call costs, and the shapes before it
have warmed the process). Writes ``benchmarks/paper/results/latency.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from baselines import add_houlsby, write_json

import lorakit
from lorakit.core.layers import Adapter

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"


def build_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16)).eval()
    lora = lorakit.add_lora(GPT2LMHeadModel(base.config).eval(), lorakit.LoraConfig(
        r=4, alpha=8, dropout=0.0, target_modules=["c_attn"], slices={"c_attn": [True, False, True]}))
    lora.load_state_dict(base.state_dict(), strict=False)  # same base weights
    with torch.no_grad():  # a trained-looking update, so merged vs unmerged is a real check
        for m in lora.modules():
            if isinstance(m, Adapter):
                m.lora_B.weight.normal_(0, 0.02)
    adapter = GPT2LMHeadModel(base.config).eval()
    adapter.load_state_dict(base.state_dict())
    add_houlsby(adapter, ("attn.c_proj", "mlp.c_proj"), 1024, 16)
    return base, lora, adapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x128", "1x32"], help="BATCHxSEQ or BATCHxSEQ:REPS")
    p.add_argument("--reps", type=int, default=5, help="repetitions of a shape that names none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--update", action="store_true",
                   help="keep the other shapes' rows of the results file (same threads and machine), replace these")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, lora, adapter = build_models()

    variants = {"base": base, "lora-merged": lora, "lora-unmerged": lora, "adapter": adapter}
    rows = []
    machine = f"{platform.machine()} {platform.processor()} torch {torch.__version__}".strip()
    if args.update and RESULTS.exists():
        old = json.loads(RESULTS.read_text())
        if old.get("machine") == machine and old.get("threads") == args.threads:
            rows = old["rows"]
    for shape in args.shapes:
        dims, _, reps = shape.partition(":")
        b, s = (int(v) for v in dims.split("x"))
        reps = int(reps) if reps else args.reps
        x = torch.randint(0, 50257, (b, s), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        outputs: dict[str, torch.Tensor] = {}  # one output per LoRA variant, to check merged == unmerged
        with torch.inference_mode():
            warmup = int(reps > 1)
            for rep in range(1 - warmup, reps + 1):  # repetition 0 warms up and is not counted
                order = names[rep % len(names):] + names[: rep % len(names)]
                for name in order:
                    if name == "lora-merged":
                        lorakit.merge(lora)
                    t0 = time.perf_counter()
                    logits = variants[name](x).logits
                    dt = time.perf_counter() - t0
                    if name == "lora-merged":
                        lorakit.unmerge(lora)
                    if name.startswith("lora-"):
                        outputs.setdefault(name, logits)
                    if rep:
                        times[name].append(dt)
        diff = (outputs["lora-merged"] - outputs["lora-unmerged"]).abs().max().item()  # fp32 round-off only
        del outputs, logits
        best = {k: min(v) for k, v in times.items()}
        row = {"batch": b, "seq": s, "ms": {k: 1000 * v for k, v in best.items()},
               "overhead_pct": {k: 100 * (v / best["base"] - 1) for k, v in best.items()},
               "median_ms": {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()}, "merged_max_diff": diff,
               "reps": reps}
        same = [i for i, r in enumerate(rows) if (r["batch"], r["seq"]) == (b, s)]
        if same:  # --update: this shape's new row in the old one's place
            rows[same[0]] = row
        else:
            rows.append(row)
        write_json(RESULTS, {"rows": rows, "threads": torch.get_num_threads(), "machine": machine})  # so far
        print(f"batch {b} seq {s}: " + "  ".join(f"{k} {row['ms'][k]:.0f} ms ({row['overhead_pct'][k]:+.1f}%)"
                                                 for k in names), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
