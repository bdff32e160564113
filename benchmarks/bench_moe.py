"""LoRA on MoE experts: lorakit's ``target_parameters`` vs PEFT's, one training step side by side (CPU).

Model: a Qwen3-MoE-style config with random weights (nothing is downloaded), fp32, transformers' default
experts implementation for CPU (``grouped_mm``)::

    hidden 512, 4 layers, 8 heads (4 KV, head_dim 64), 32 experts, top-4, moe_intermediate 256, vocab 4096
    batch 2 x 256 tokens; LoRA r=8, alpha=16 on experts.gate_up_proj and experts.down_proj only

Both libraries get identical adapter weights (lorakit's checkpoint loaded into PEFT with
``PeftModel.from_pretrained``) and their losses are checked to agree before anything is timed.

- **step time**: forward, loss, backward, AdamW step, zero_grad; the best of ``--reps`` repetitions in
  rotating order (lorakit, PEFT / PEFT, lorakit ...), ``torch.set_num_threads(1)`` so the ratio holds on a
  loaded machine. Medians are printed too.
- **peak memory**: in a fresh subprocess per library, the peak resident set size (VmHWM, reset through
  ``/proc/self/clear_refs``) over two steps minus the resident size before them (benchmarks/common.py,
  as bench_lora.py).

    python benchmarks/bench_moe.py            # ~1-2 min
    python benchmarks/bench_moe.py --quick    # smaller config, smoke run
    python benchmarks/bench_moe.py --per-row 4 64   # inference: 4 rows x 64 tokens, each on its own expert adapter

``--per-row ROWS SEQ``: an inference forward (no grad) of ROWS rows, each on its own expert adapter, through
``per_row_adapters`` (tokens grouped by adapter, then expert), against the same rows run one forward per
adapter (``use_adapter`` on each row alone) and against every row on one shared adapter (the lower bound).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from common import adamw_step, in_child, peak_growth_mib

import lorakit

THREADS = 1
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
CONFIGS = {
    "full": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32,
                 num_experts_per_tok=4, batch=2, seq=256),
    "quick": dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                  num_experts_per_tok=2, batch=2, seq=64),
}


def build(size: str):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    spec = dict(CONFIGS[size])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**spec))
    ids = torch.randint(0, spec["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, ids


def make(variant: str, size: str, adapter_dir: str):
    """The model with the adapter saved in ``adapter_dir`` (lorakit) or the same adapter in PEFT."""
    model, ids = build(size)
    if variant == "lorakit":
        lorakit.load_adapter(model, adapter_dir)
        lorakit.set_adapter(model, "default")  # trainable
    else:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return model.train(), ids


def save_reference_adapter(size: str, path: str) -> None:
    model, _ = build(size)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_parameters=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B random too, so the update is not zero
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    lorakit.save_adapter(model, path)


def timing(size: str, adapter_dir: str, reps: int) -> dict:
    models = {v: make(v, size, adapter_dir) for v in ("lorakit", "peft")}
    with torch.no_grad():
        losses = {v: m(input_ids=ids, labels=ids).loss.item() for v, (m, ids) in models.items()}
    if abs(losses["lorakit"] - losses["peft"]) > 1e-4 * abs(losses["peft"]):
        raise SystemExit(f"lorakit and PEFT disagree before timing: {losses}")
    steps = {v: adamw_step(m, ids, lr=1e-4) for v, (m, ids) in models.items()}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in steps}
    order = list(steps)
    for i in range(reps):
        for v in order[i % 2:] + order[:i % 2]:  # rotating order
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    return {"loss": losses, "best_s": {v: min(t) for v, t in times.items()},
            "median_s": {v: statistics.median(t) for v, t in times.items()}}


def memory_child(variant: str, size: str, adapter_dir: str) -> None:
    torch.set_num_threads(THREADS)
    model, ids = make(variant, size, adapter_dir)
    print(json.dumps({"peak_growth_mib": peak_growth_mib(adamw_step(model, ids, lr=1e-4))}))


def peak_memory(variant: str, size: str, adapter_dir: str) -> float:
    return in_child(__file__, "--_memory-child", variant, size, adapter_dir)["peak_growth_mib"]


def per_row(size: str, rows: int, seq: int, reps: int) -> str:
    model, _ = build(size)
    names = [f"a{i}" for i in range(rows)]
    gen = torch.Generator().manual_seed(1)
    for name in names:
        lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_parameters=TARGETS), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".parts." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))

    def mixed():
        with lorakit.per_row_adapters(model, names):
            return model(ids).logits

    def one_by_one():
        outs = []
        for i, name in enumerate(names):
            with lorakit.use_adapter(model, name):
                outs.append(model(ids[i:i + 1]).logits)
        return torch.cat(outs)

    def shared():
        with lorakit.use_adapter(model, names[0]):
            return model(ids).logits

    with torch.no_grad():
        err = (mixed() - one_by_one()).abs().max().item()
        if err > 1e-4:
            raise SystemExit(f"per-row rows differ from their adapters alone by {err:.2e}")
        fns = {"mixed": mixed, "one_by_one": one_by_one, "shared": shared}
        times: dict[str, list[float]] = {v: [] for v in fns}
        for fn in fns.values():
            fn()  # warm-up
        for i in range(reps):
            order = list(fns)[i % 3:] + list(fns)[:i % 3]
            for v in order:
                t0 = time.perf_counter()
                fns[v]()
                times[v].append(time.perf_counter() - t0)
    best = {v: min(t) for v, t in times.items()}
    return (f"config {size}, {rows} rows x {seq} tokens, r=8 on {TARGETS}, {THREADS} thread, max |row - alone| "
            f"{err:.1e}; load {open('/proc/loadavg').read().split()[:3]}\n"
            "| inference forward, best of %d | per_row_adapters (%d adapters) | one forward per adapter | one shared "
            "adapter | per-row / one-by-one | per-row / shared |\n|---|---|---|---|---|---|\n" % (reps, rows)
            + f"| seconds | {best['mixed']:.3f} | {best['one_by_one']:.3f} | {best['shared']:.3f} | "
              f"{best['mixed'] / best['one_by_one']:.3f} | {best['mixed'] / best['shared']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small config (smoke run)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--per-row", type=int, nargs=2, metavar=("ROWS", "SEQ"),
                   help="inference: ROWS rows of SEQ tokens, each on its own expert adapter, per-row vs one by one")
    p.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory_child:
        return memory_child(*args._memory_child)
    torch.set_num_threads(THREADS)
    size = "quick" if args.quick else "full"
    if args.per_row:
        print(per_row(size, *args.per_row, args.reps))
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_adapter(size, tmp)
        mem = {v: peak_memory(v, size, tmp) for v in ("lorakit", "peft")}
        t = timing(size, tmp, args.reps)
    best, med = t["best_s"], t["median_s"]
    print(f"config {size}: {CONFIGS[size]}; r=8 on {TARGETS}; {THREADS} thread; load {open('/proc/loadavg').read().split()[:3]}")
    print(f"loss (no grad)     lorakit {t['loss']['lorakit']:.6f}  PEFT {t['loss']['peft']:.6f}")
    print("| metric | lorakit | PEFT | lorakit/PEFT |\n|---|---|---|---|")
    print(f"| step time, best of {args.reps} (s) | {best['lorakit']:.3f} | {best['peft']:.3f} | "
          f"{best['lorakit'] / best['peft']:.3f} |")
    print(f"| step time, median (s) | {med['lorakit']:.3f} | {med['peft']:.3f} | {med['lorakit'] / med['peft']:.3f} |")
    print(f"| peak RSS growth of a step (MiB) | {mem['lorakit']:.0f} | {mem['peft']:.0f} | "
          f"{mem['lorakit'] / mem['peft']:.3f} |")


if __name__ == "__main__":
    main()
