"""DoRA training step: lorakit DoRA vs PEFT DoRA vs plain LoRA, side by side in one run (CPU or CUDA).

    python benchmarks/bench_dora.py                 # LLaMA-style config, batch 8 x 128, ~4 min on 2 cores
    python benchmarks/bench_dora.py --quick         # small shapes, ~1 min
    python benchmarks/bench_dora.py --device cuda --shape 8 512 --model llama
    python benchmarks/bench_dora.py --layer 2048 1024 --reps 50   # one adapted layer alone
    python benchmarks/bench_dora.py --infer 2048 1 --threads 1    # inference forward: cached row norms or not

Variants, all on one randomly initialised base (nothing downloaded), r=8, alpha=16 on q_proj, v_proj
(LLaMA) or c_attn (GPT-2's Conv1D): ``lora`` (lorakit plain LoRA), ``dora`` (lorakit DoRA), ``peft_dora``
(PEFT's DoRA holding lorakit's exact weights; outputs checked to agree first), ``peft_lora``.
Step = forward, loss, backward, AdamW, zero_grad. Times: best of ``--reps`` repetitions in rotating order
(common.alternate). Memory: CPU, peak RSS growth over two steps in a fresh subprocess per variant
(common.peak_growth_mib, as bench_lora); CUDA, ``torch.cuda.max_memory_allocated`` growth over two steps in
this process.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import nullcontext

import torch
from bench_lora import SPECS, THREADS, build_model, close, randomize_B, vocab
from common import adamw_step, alternate, environment, fmt_ms, in_child, peak_growth_mib
from torch import nn

import lorakit
from lorakit.variants.derived import Derived

VARIANTS = ("lora", "dora", "peft_dora", "peft_lora")


def make(variant: str, base: nn.Module, model_name: str, copy_base: bool = True) -> nn.Module:
    """``variant`` on (a copy of) ``base``; PEFT variants get lorakit's weights for the same config."""
    targets = list(SPECS[model_name].train_targets)
    dora = variant in ("dora", "peft_dora")
    model = copy.deepcopy(base) if copy_base else base
    torch.manual_seed(1)
    lk = lorakit.add_lora(model if variant in ("lora", "dora") else copy.deepcopy(base),
                          lorakit.LoraConfig(r=8, alpha=16, target_modules=targets, use_dora=dora))
    randomize_B(lk, seed=1)
    if variant in ("lora", "dora"):
        return lk
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=dora,
                          fan_in_fan_out=model_name == "gpt2")
    twin = peft.get_peft_model(model, cfg)
    result = peft.set_peft_model_state_dict(twin, lorakit.lora_state_dict(lk))
    if result.unexpected_keys:
        raise RuntimeError(f"PEFT did not take keys {result.unexpected_keys[:3]}")
    return twin


def memory_child(variant: str, model_name: str, b: int, s: int) -> None:
    """Subprocess entry (CPU): peak RSS growth (MiB) over two steps of one variant; prints JSON."""
    torch.set_num_threads(THREADS)
    model = make(variant, build_model(model_name), model_name, copy_base=False).train()
    ids = torch.randint(0, vocab(model), (b, s), generator=torch.Generator().manual_seed(0))
    print(json.dumps({"mib": peak_growth_mib(adamw_step(model, ids, lr=1e-5))}))


def cuda_memory(model: nn.Module, ids: torch.Tensor) -> float:
    step = adamw_step(model, ids, lr=1e-5)
    step()  # optimizer state allocated once, then measured like the CPU case: growth over steps
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def layer_case(dim: int, tokens: int, reps: int, dev: torch.device) -> str:
    """One adapted Linear(dim, dim) alone: forward + backward of the layer, per variant (less noise than a
    whole model on a shared machine: many more repetitions fit)."""
    import peft

    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(dim, dim)).to(dev)
    x = torch.randn(tokens, dim, generator=g).to(dev)
    layers = {}
    for v in VARIANTS:
        dora = "dora" in v
        torch.manual_seed(1)
        lk = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=8, alpha=16, target_modules=["0"],
                                                                      use_dora=dora))
        with torch.no_grad():
            lk[0].adapters["default"].lora_B.weight.normal_(0, 0.02)
        if v.startswith("peft"):
            twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                                             use_dora=dora))
            peft.set_peft_model_state_dict(twin, lorakit.lora_state_dict(lk))
            lk = twin
        layers[v] = lk.train()
    close(layers["dora"](x), layers["peft_dora"](x), "DoRA layer output")

    def fwd_bwd(m):
        def run():
            m(x).square().mean().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return run

    t = alternate({v: fwd_bwd(m) for v, m in layers.items()}, reps, warmup=3)
    head = f"| Linear({dim}, {dim}), {tokens} tokens, forward + backward | lorakit DoRA | PEFT DoRA | lorakit/PEFT | " \
           "lorakit DoRA/LoRA | PEFT DoRA/LoRA |"
    row = (f"| best of {reps} | {fmt_ms(t['dora'])} | {fmt_ms(t['peft_dora'])} | {t['dora'] / t['peft_dora']:.3f} | "
           f"{t['dora'] / t['lora']:.3f} | {t['peft_dora'] / t['peft_lora']:.3f} |")
    return "\n".join([head, "|---|---|---|---|---|---|", row])


def infer_case(dim: int, tokens: int, reps: int) -> str:
    """Inference forward (``torch.no_grad`` inside ``use_adapter``) of one adapted Linear(dim, dim): lorakit DoRA
    with its row norms cached (they are recomputed only when W0, A or B change), the same with the cache dropped
    before every call (what every forward paid before), PEFT's DoRA (recomputes per forward), plain LoRA."""
    import peft

    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(dim, dim))
    x = torch.randn(tokens, dim, generator=g)
    models = {}
    for v in ("lora", "dora", "peft_dora"):
        torch.manual_seed(1)
        lk = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=8, alpha=16, target_modules=["0"],
                                                                      use_dora=v != "lora"))
        with torch.no_grad():
            lk[0].adapters["default"].lora_B.weight.normal_(0, 0.02)
        if v == "peft_dora":
            twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                                            use_dora=True))
            peft.set_peft_model_state_dict(twin, lorakit.lora_state_dict(lk))
            lk = twin
        models[v] = lk.eval()
    dora = models["dora"][0].adapters["default"]

    def forward(m, drop=False):
        def run():
            if drop:
                dora._norms = Derived()  # forget the kept row norms: what every forward computed before
            with torch.no_grad(), lorakit.use_adapter(m, "default") if m is not models["peft_dora"] else nullcontext():
                return m(x)
        return run

    with torch.no_grad():
        close(forward(models["dora"])(), forward(models["peft_dora"])(), "DoRA inference output", tol=1e-5)
    fns = {"cached": forward(models["dora"]), "uncached": forward(models["dora"], drop=True),
           "peft_dora": forward(models["peft_dora"]), "lora": forward(models["lora"])}
    t = alternate(fns, reps, warmup=3)
    head = f"| Linear({dim}, {dim}), {tokens} token(s), inference forward | DoRA, norms cached | DoRA, norms per " \
           "forward (before) | PEFT DoRA | plain LoRA | before/cached |"
    row = (f"| best of {reps} | {fmt_ms(t['cached'])} | {fmt_ms(t['uncached'])} | {fmt_ms(t['peft_dora'])} | "
           f"{fmt_ms(t['lora'])} | {t['uncached'] / t['cached']:.2f} |")
    return "\n".join([head, "|---|---|---|---|---|---|", row])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SPECS), default="llama")
    p.add_argument("--shape", type=int, nargs=2, metavar=("BATCH", "SEQ"))
    p.add_argument("--reps", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="batch 2 x 64, 2 repetitions")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--layer", type=int, nargs=2, metavar=("DIM", "TOKENS"),
                   help="time one adapted Linear(DIM, DIM) on TOKENS tokens instead of a whole model")
    p.add_argument("--infer", type=int, nargs=2, metavar=("DIM", "TOKENS"),
                   help="time the inference forward of one adapted Linear(DIM, DIM): DoRA's row norms cached or not")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.infer:
        print(environment(), flush=True)
        print("\n" + infer_case(*args.infer, args.reps or 50))
        return None
    if args._memory_child:
        v, m, b, s = args._memory_child
        return memory_child(v, m, int(b), int(s))
    if args.layer:
        print(environment(), flush=True)
        print("\n" + layer_case(*args.layer, args.reps or 50, torch.device(args.device)))
        return None
    b, s = args.shape or ((2, 64) if args.quick else (8, 128))
    reps = args.reps or (2 if args.quick else 5)
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    env = environment() + (f"; {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "")
    print(env, flush=True)
    base = build_model(args.model).to(dev)
    models = {v: make(v, base, args.model).to(dev) for v in VARIANTS}
    ids = torch.randint(0, vocab(base), (b, s), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        close(models["dora"](ids).logits, models["peft_dora"](ids).logits, "DoRA logits")
        close(models["lora"](ids).logits, models["peft_lora"](ids).logits, "LoRA logits")
    for m in models.values():
        m.train()
    steps = {v: adamw_step(m, ids, lr=1e-5) for v, m in models.items()}
    if dev.type == "cuda":
        inner = steps

        def synced(fn):
            def run():
                fn()
                torch.cuda.synchronize()
            return run

        steps = {v: synced(fn) for v, fn in inner.items()}
    t = alternate(steps, reps)
    if dev.type == "cuda":
        mem = {v: cuda_memory(m, ids) for v, m in models.items()}
        mem_what = "peak CUDA memory growth over 2 steps, MiB"
    else:
        del models, steps
        mem = {v: _child(v, args.model, b, s) for v in VARIANTS}
        mem_what = "peak RSS growth over 2 steps, MiB"
    rows = [
        ("step time", fmt_ms(t["dora"]), fmt_ms(t["peft_dora"]), f"{t['dora'] / t['peft_dora']:.3f}",
         f"{t['dora'] / t['lora']:.3f}", f"{t['peft_dora'] / t['peft_lora']:.3f}",
         f"{fmt_ms(t['lora'])} / {fmt_ms(t['peft_lora'])}"),
        (mem_what, f"{mem['dora']:.0f}", f"{mem['peft_dora']:.0f}", f"{mem['dora'] / mem['peft_dora']:.3f}",
         f"{mem['dora'] / mem['lora']:.3f}", f"{mem['peft_dora'] / mem['peft_lora']:.3f}",
         f"{mem['lora']:.0f} / {mem['peft_lora']:.0f}"),
    ]
    head = ("metric", "lorakit DoRA", "PEFT DoRA", "lorakit/PEFT", "lorakit DoRA/LoRA", "PEFT DoRA/LoRA",
            "plain LoRA lorakit / PEFT")
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    md = (f"{env}; `python benchmarks/bench_dora.py {' '.join(argv or sys.argv[1:])}`: {args.model}, "
          f"batch {b} x {s}, r=8 ({time.perf_counter() - t0:.0f} s)\n\n{table}\n")
    print("\n" + md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


def _child(variant: str, model_name: str, b: int, s: int) -> float:
    return in_child(__file__, "--_memory-child", variant, model_name, b, s)["mib"]


if __name__ == "__main__":
    main()
