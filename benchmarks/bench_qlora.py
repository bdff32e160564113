"""QLoRA vs LoRA on a full-precision base, side by side on CPU: one run, the same LLaMA-style config.

    nice -n 10 python benchmarks/bench_qlora.py                  # fp32 vs nf4 (+ int8), ~8 min on 2 cores
    python benchmarks/bench_qlora.py --modes fp32 nf4 int8 --reps 2 --out results.md

For each base (``fp32``: plain ``nn.Linear``; ``nf4`` / ``fp4`` / ``int8``: ``lorakit.quantize`` with that preset)
a fresh subprocess builds the model from a config (random weights, seeded alike), quantizes it, adds LoRA
(r=16, alpha=32, every linear layer but the head: QLoRA's recipe) and trains a few steps on random tokens
(batch 4 x 128, AdamW). It reports:

- bytes of the base's linear weights, quantization constants included (``lorakit.core.quantized.weight_bytes``:
  4-bit codes + per-block absmax (+ their own constants with double quantization) + code table; int8 codes
  + one scale per row), output head and embeddings excluded (never quantized);
- resident memory of the ready model (RSS after building, quantizing and returning freed memory to the OS,
  minus the RSS of the interpreter before the model was built);
- peak resident memory during the training steps, the same baseline subtracted (Linux ``VmHWM``, reset with
  ``/proc/self/clear_refs`` just before the first step): weights + activations + gradients + optimizer state;
- step time (forward, loss, backward, AdamW step): the median of the steps after the first.

Subprocesses run in rotating order (fp32 nf4, nf4 fp32, ...) and a step time is the best of the ``--reps``
medians, since the machine is shared and interference only adds time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CONFIG = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
BATCH, SEQ, THREADS = 4, 128, 2


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is held
    except OSError:
        pass


def worker(mode: str, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.core.quantized import PRESETS, weight_bytes

    torch.set_num_threads(THREADS)
    _trim()
    baseline = _status_kib("VmRSS")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if mode != "fp32":
        lorakit.quantize(model, **PRESETS[mode])
    linear_bytes = sum(weight_bytes(m) for n, m in model.named_modules()
                       if hasattr(m, "weight") and "Linear" in type(m).__name__ and n != "lm_head")
    lorakit.add_lora(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    trainable, _ = lorakit.trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    model.train()
    _trim()
    ready = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = _status_kib("VmHWM")
    return {"mode": mode, "linear_weight_bytes": linear_bytes, "trainable": trainable,
            "ready_mib": (ready - baseline) / 1024, "peak_mib": (peak - baseline) / 1024,
            "step_growth_mib": (peak - ready) / 1024, "step_s": statistics.median(times[1:]),
            "first_loss": losses[0], "last_loss": losses[-1]}


def run_worker(mode: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(steps)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["fp32", "nf4"], choices=["fp32", "nf4", "fp4", "int8"])
    p.add_argument("--steps", type=int, default=3, help="training steps per subprocess (the first is warm-up)")
    p.add_argument("--reps", type=int, default=2, help="subprocesses per base, in rotating order")
    p.add_argument("--out", help="also write the table (markdown) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.reps):
        order = args.modes[rep % len(args.modes):] + args.modes[:rep % len(args.modes)]
        for mode in order:
            r = run_worker(mode, args.steps)
            runs[mode].append(r)
            print(f"rep {rep} {mode:5s} step {r['step_s']:.3f} s  peak {r['peak_mib']:.0f} MiB  "
                  f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  load {os.getloadavg()[0]:.1f}", flush=True)
    import torch

    ref = runs["fp32"][0] if "fp32" in runs else None

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if ref else "-"

    ref_step = min(r["step_s"] for r in runs["fp32"]) if ref else None
    lines = [f"LLaMA-style config {CONFIG}, batch {BATCH} x {SEQ}, LoRA r=16 on all linear layers, AdamW; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {THREADS} threads, "
             f"{args.reps} subprocess(es) per base x {args.steps} steps; {time.perf_counter() - t0:.0f} s in all",
             "", "| base | linear weights, MiB | vs fp32 | ready model, MiB | peak in a training step, MiB | vs fp32 "
             "| step growth, MiB | step time, s | vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, rs in runs.items():
        r = rs[0]
        peak = max(x["peak_mib"] for x in rs)
        step = min(x["step_s"] for x in rs)
        lines.append(f"| {mode} | {r['linear_weight_bytes'] / 2**20:.1f} | "
                     f"{ratio(r['linear_weight_bytes'], ref['linear_weight_bytes'])} | {r['ready_mib']:.0f} | "
                     f"{peak:.0f} | {ratio(peak, max(x['peak_mib'] for x in runs['fp32']))} | "
                     f"{max(x['step_growth_mib'] for x in rs):.0f} | {step:.2f} | {ratio(step, ref_step)} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
