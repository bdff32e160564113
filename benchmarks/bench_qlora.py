"""QLoRA vs LoRA on a full-precision base, side by side on CPU: one run, the same LLaMA-style config.

    nice -n 10 python benchmarks/bench_qlora.py --modes fp32 nf4 int8   # ~10 min on 2 cores
    python benchmarks/bench_qlora.py --rounds 2 --out results.md        # fp32 vs nf4, quicker

For each base (``fp32``: plain ``nn.Linear``; ``nf4`` / ``fp4`` / ``int8``: ``lorakit.quantize`` with that preset)
the model is built from a config (random weights, seeded alike), quantized, given LoRA (r=16, alpha=32,
every linear layer but the head: QLoRA's recipe) and trained on random tokens (batch 2 x 128, AdamW).
Reported:

- bytes of the base's linear weights, quantization constants included (``lorakit.variants.quantized.weight_bytes``:
  4-bit codes + per-block absmax (+ their own constants with double quantization) + code table; int8 codes
  + one scale per row), output head and embeddings excluded (never quantized);
- in a fresh subprocess per base: resident memory of the ready model (RSS after building, quantizing and
  returning freed memory to the OS, minus the RSS of the interpreter with torch, transformers' LLaMA and bitsandbytes imported),
  and the peak resident memory over the training steps with the same baseline (Linux ``VmHWM``, reset with
  ``/proc/self/clear_refs`` just before the first step): weights + activations + gradients + optimizer state;
- step time (forward, loss, backward, AdamW step) of every base in ONE process, the bases alternating step by
  step in rotating order; the best step (the machine is shared: interference only adds time) and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CONFIG = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
BATCH, SEQ, THREADS = 2, 128, 2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import reset_peak, status_kb, trim_heap  # noqa: E402 (the memory readers the benchmarks share)


def build(mode: str):
    """The model for base ``mode`` with LoRA, its optimizer and a batch; and the base's linear-weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.variants.quantized import PRESETS, weight_bytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if mode != "fp32":
        lorakit.quantize(model, **PRESETS[mode])
    linear_bytes = sum(weight_bytes(m) for n, m in model.named_modules()
                       if hasattr(m, "weight") and "Linear" in type(m).__name__ and n != "lm_head")
    lorakit.add_lora(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    model.train()
    return model, optimizer, ids, linear_bytes


def train_step(model, optimizer, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def memory_worker(mode: str, steps: int) -> dict:
    """In a fresh process: RSS of the ready model and peak RSS over ``steps`` training steps (baseline: the
    interpreter with the libraries imported)."""
    import bitsandbytes  # noqa: F401 (every library imported before the baseline is read, in both processes)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    import lorakit  # noqa: F401

    torch.set_num_threads(THREADS)
    trim_heap()
    baseline = status_kb("VmRSS")
    model, optimizer, ids, linear_bytes = build(mode)
    trim_heap()
    ready = status_kb("VmRSS")
    reset_peak()
    losses = [train_step(model, optimizer, ids) for _ in range(steps)]
    peak = status_kb("VmHWM")
    return {"mode": mode, "linear_weight_bytes": linear_bytes, "ready_mib": (ready - baseline) / 1024,
            "peak_mib": (peak - baseline) / 1024, "step_growth_mib": (peak - ready) / 1024, "losses": losses}


def run_memory_worker(mode: str, steps: int) -> dict:
    # large blocks always mmap'd: freed memory leaves the RSS at once in both processes (no heap slack)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(steps)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(modes: list[str], rounds: int) -> dict[str, list[float]]:
    """Step times of every base in this one process, the bases alternating step by step in rotating order."""
    import torch

    torch.set_num_threads(THREADS)
    built = {m: build(m)[:3] for m in modes}
    for m in modes:
        train_step(*built[m])  # warm-up: optimizer state, first-call costs
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(rounds):
        for m in modes[i % len(modes):] + modes[:i % len(modes)]:
            t0 = time.perf_counter()
            train_step(*built[m])
            times[m].append(time.perf_counter() - t0)
        print(f"round {i}: " + "  ".join(f"{m} {times[m][-1]:.2f} s" for m in modes)
              + f"  load {os.getloadavg()[0]:.1f}", flush=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["fp32", "nf4"], choices=["fp32", "nf4", "fp4", "int8"])
    p.add_argument("--steps", type=int, default=2, help="training steps in each memory subprocess")
    p.add_argument("--rounds", type=int, default=4, help="timed steps per base (after one warm-up step)")
    p.add_argument("--out", help="also write the table (markdown) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.steps)))
        return
    modes = ["fp32"] + [m for m in args.modes if m != "fp32"]  # fp32 is the reference of every ratio
    t0 = time.perf_counter()
    mem = {}
    for mode in modes:
        mem[mode] = run_memory_worker(mode, args.steps)
        print(f"memory {mode:5s} ready {mem[mode]['ready_mib']:.0f} MiB  peak {mem[mode]['peak_mib']:.0f} MiB  "
              f"losses {[round(x, 3) for x in mem[mode]['losses']]}", flush=True)
    times = time_steps(modes, args.rounds)
    import torch

    ref, best = mem["fp32"], {m: min(times[m]) for m in modes}
    lines = [f"LLaMA-style config {CONFIG}, batch {BATCH} x {SEQ}, LoRA r=16 on all linear layers, AdamW; "
             f"{platform.machine()}, torch {torch.__version__}, {THREADS} threads; memory: one fresh process per "
             f"base, {args.steps} steps; time: best of {args.rounds} steps per base, alternating in one process; "
             f"{time.perf_counter() - t0:.0f} s in all, load average {os.getloadavg()[0]:.1f} at the end",
             "", "| base | linear weights, MiB | vs fp32 | ready model, MiB | vs fp32 | peak in a training step, MiB "
             "| vs fp32 | step time, s (best / median) | vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        r = mem[mode]
        lines.append(f"| {mode} | {r['linear_weight_bytes'] / 2**20:.1f} | "
                     f"{r['linear_weight_bytes'] / ref['linear_weight_bytes']:.3f} | {r['ready_mib']:.0f} | "
                     f"{r['ready_mib'] / ref['ready_mib']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] / ref['peak_mib']:.3f} | {best[mode]:.2f} / {statistics.median(times[mode]):.2f} | "
                     f"{best[mode] / best['fp32']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
