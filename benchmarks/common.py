"""What the side-by-side benchmarks share: timing in rotating order, the environment line, one AdamW training
step, and the peak resident memory of training steps measured in a fresh process.

Imported as ``common`` by the scripts in this folder (run as ``python benchmarks/bench_x.py``, which puts the
folder on the path)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Best (minimum) seconds per call of each fn over ``reps`` repetitions run in rotating order.

    The minimum, not the median: this machine is shared, and other work only ever adds time (timeit's
    rule). Medians go to the log so the spread can be judged.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    print("    " + ", ".join(f"{n}: best {fmt_ms(min(t))} median {fmt_ms(statistics.median(t))}"
                             for n, t in times.items()) + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    return {n: min(t) for n, t in times.items()}


def environment() -> str:
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {torch.get_num_threads()} threads; python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}; fp32")


def adamw_step(model: nn.Module, ids: torch.Tensor, lr: float) -> Callable[[], float]:
    """One training step as a closure: causal-LM loss on ``ids``, backward, AdamW over the trainable
    parameters, ``zero_grad(set_to_none=True)``; returns the loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ----- memory (Linux): resident set size from /proc/self/status ------------------------------------------------
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (``malloc_trim``), so RSS shows what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def reset_peak() -> None:
    """Reset the peak resident size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_growth_mib(step: Callable[[], object], steps: int = 2) -> float:
    """Peak RSS growth (MiB) over ``steps`` calls of ``step``, above the resident size just before them.

    Freed heap memory is handed back first, so that no variant's steps can reuse memory that is already counted
    in its baseline; the caller builds the variant in place (no copies freed before the measurement).
    """
    trim_heap()
    rss0 = status_kb("VmRSS")
    reset_peak()
    for _ in range(steps):
        step()
    return (status_kb("VmHWM") - rss0) / 1024


def in_child(script: str, *args: object) -> dict:
    """``python script *args`` in a fresh process (nothing an earlier variant freed can hide a peak); the JSON
    object its last line of output prints."""
    out = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
