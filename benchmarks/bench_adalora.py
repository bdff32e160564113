"""AdaLoRA training step: lorakit AdaLoRA vs PEFT AdaLoRA vs plain LoRA, side by side in one run (CPU).

    python benchmarks/bench_adalora.py              # MiniLM-L6-shaped BERT (random init), batch 8 x 32, ~2 min
    python benchmarks/bench_adalora.py --reps 10 --batch 16 --seq 64

Every variant has rank 8 on every encoder linear layer (query, key, value, the three dense) of one randomly
initialised ``BertForSequenceClassification`` shaped like all-MiniLM-L6 (6 layers x 384; nothing
downloaded). Step = forward, loss, backward, AdamW, zero_grad, plus for AdaLoRA the orthogonality penalty
in the loss and the allocator after the optimizer step (lorakit: ``AdaLoraAllocator.step``; PEFT:
``update_and_allocate``, its penalty added inside ``forward``), both in the budget phase with a
re-allocation every step (``delta_t = 1``: the most allocator work per step). Times: best of ``--reps``
in rotating order (``common.alternate``).
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_lora import THREADS
from common import alternate, environment, fmt_ms
from torch import nn

import lorakit

TARGETS = ["query", "key", "value", "dense"]
VARIANTS = ("lora", "adalora", "peft_lora", "peft_adalora")


def build_base() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     vocab_size=30522, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).train()


def make(variant: str, base: nn.Module, total: int):
    """(model, the function that runs after optimizer.step(), the extra loss term or None)."""
    model = copy.deepcopy(base)
    targets = r"bert\.encoder\.layer\.\d+\..*(query|key|value|dense)"
    if variant in ("lora", "adalora"):
        cls = lorakit.AdaLoraConfig if variant == "adalora" else lorakit.LoraConfig
        lorakit.add_lora(model, cls(r=8, alpha=16, target_modules=targets))
        if variant == "lora":
            return model, None, None
        alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=total, delta_t=1, orth_reg_weight=0.1)
        return model, alloc.step, alloc.regularization
    import peft

    if variant == "peft_lora":
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)), None, None
    cfg = peft.AdaLoraConfig(init_r=8, target_r=2, lora_alpha=16, target_modules=targets, total_step=total,
                             tinit=0, tfinal=0, deltaT=1, orth_reg_weight=0.1)
    pm = peft.get_peft_model(model, cfg)
    return pm, pm.base_model.update_and_allocate, None


def step_fn(model: nn.Module, after, extra, batch: dict):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    count = [0]

    def step() -> float:
        loss = model(**batch).loss
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()
        count[0] += 1
        if after is not None:
            after(count[0])
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (1 on a crowded machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(environment(), f"(torch threads {args.threads})")
    base = build_base()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 30522, (args.batch, args.seq), generator=g),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    total = 10 * (args.reps + 2)  # every timed step falls in the budget phase
    fns = {v: step_fn(*make(v, base, total), batch) for v in VARIANTS}
    best = alternate(fns, args.reps)
    print(f"\ntrain step, batch {args.batch} x {args.seq}, rank 8 on 36 matrices (best of {args.reps})")
    print("| variant | step | vs lorakit LoRA | vs PEFT AdaLoRA |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {fmt_ms(best[v])} | {best[v] / best['lora']:.2f}x | {best[v] / best['peft_adalora']:.2f}x |")


if __name__ == "__main__":
    main()
