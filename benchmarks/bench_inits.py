"""What an initialiser costs: ``add_lora`` time per init on the same base, side by side in one run.

    python benchmarks/bench_inits.py                # 4 layers of 2048 x 2048, r=16, ~2 min on 2 cores
    python benchmarks/bench_inits.py --dim 1024 --layers 2 --reps 3

Inits: kaiming (PEFT's default), gaussian, pissa (full SVD), pissa_niter_4 (randomized SVD), olora (QR).
Also reported: how far pissa_niter_4's ``s·B·A`` is from the best rank-r approximation PiSSA takes
(relative Frobenius error), and the size of the plain-LoRA conversion (rank 2r) against the adapter.
Times: best of ``--reps`` in rotating order (common.alternate).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from bench_lora import THREADS
from common import alternate
from torch import nn

import lorakit

INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_4", "olora")


def base_model(dim: int, layers: int) -> nn.Module:
    """Linear layers with a decaying spectrum (as trained weights have), seeded."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(layers)])
    with torch.no_grad():
        for m in model:
            U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
            V, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
            m.weight.copy_(U * torch.arange(1, dim + 1).float().pow(-0.5) @ V.T)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    base = base_model(args.dim, args.layers)
    targets = [str(i) for i in range(args.layers)]

    def add(init):
        return lambda: lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=args.r, init=init,
                                                                                target_modules=targets))

    copy_only = {"copy": lambda: copy.deepcopy(base)}
    t = alternate({**copy_only, **{init: add(init) for init in INITS}}, args.reps)
    print(f"\n{args.layers} x Linear({args.dim}, {args.dim}), r={args.r}: add_lora seconds (deepcopy "
          f"{t['copy']:.3f} s subtracted)\n")
    print("| init | add_lora (s) | vs kaiming |\n|---|---|---|")
    for init in INITS:
        cost = t[init] - t["copy"]
        print(f"| {init} | {cost:.3f} | {cost / (t['kaiming'] - t['copy']):.0f}x |")
    exact, fast = add("pissa")(), add("pissa_niter_4")()
    errs = []
    for a, b in zip(exact, fast, strict=True):
        da, db = a.adapters["default"].delta_matrix(), b.adapters["default"].delta_matrix()
        errs.append(((da - db).norm() / da.norm()).item())
    print(f"\npissa_niter_4 vs pissa, ||sBA - sBA_exact|| / ||sBA_exact||: max {max(errs):.2e}")
    with tempfile.TemporaryDirectory() as d:
        plain = lorakit.save_adapter(exact, Path(d) / "a")
        conv = lorakit.save_adapter(exact, Path(d) / "b", convert_to_lora=True)
        size = {k: (v / "adapter_model.safetensors").stat().st_size / 2**20 for k, v in (("a", plain), ("b", conv))}
    print(f"adapter {size['a']:.2f} MiB, converted plain LoRA (rank {2 * args.r}) {size['b']:.2f} MiB")


if __name__ == "__main__":
    main()
