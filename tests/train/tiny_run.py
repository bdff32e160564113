"""A tiny, deterministic training run for the subprocess tests (plain, resumed, torchrun DDP / FSDP).

    python tests/train/tiny_run.py OUT [--max-steps N] [--save-every N] [--dropout P] [--delay S] [--resume]
    torchrun --nproc_per_node=2 tests/train/tiny_run.py OUT --dist-suite
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lorakit
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train


class TinyNet(nn.Module):
    """An MLP classifier that answers like a transformers model: ``{"logits", "loss"}`` given labels."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 4, delay: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, hidden)])
        self.head = nn.Linear(hidden, classes)
        self.delay = delay  # seconds per forward, so a test can kill the run mid-way

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        for layer in self.layers:
            x = torch.relu(layer(x))
        logits = self.head(x)  # (B, classes)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_data(n: int = 256, dim: int = 16, classes: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(-1)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def build(dropout: float, delay: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet(delay=delay)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["0", "1"],
                                               modules_to_save=["head"]))
    return model


class Crash(Exception):
    """Raised by the test's evaluate() to stand in for a crash mid-run."""


def run(out: str, *, max_steps: int = 40, save_every: int | None = None, batch_size: int = 8, dropout: float = 0.1,
        delay: float = 0.0, fsdp: bool = False, resume: bool = False, crash_at_eval: int = 0, plot: bool = False) -> None:
    """Train a fresh :func:`build` model on :func:`make_data` with a fixed config into ``out``."""
    data = make_data()
    model = build(dropout, delay)
    calls = []

    def evaluate(m: nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == crash_at_eval:
            raise Crash(f"crash at evaluation {crash_at_eval}")
        batch = collate(data[:64])
        return {"accuracy": (m(batch["x"])["logits"].argmax(-1) == batch["labels"]).float().mean().item()}

    cfg = TrainConfig(output_dir=out, lr=1e-2, lora_plus_ratio=4.0, max_steps=max_steps, batch_size=batch_size,
                      warmup_steps=3, scheduler="cosine", seed=7, eval_every=10, save_every=save_every,
                      log_every=5, progress=False, fsdp=fsdp, plot=plot)
    train(model, data, collate, cfg, evaluate=evaluate, resume_from=True if resume else None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=None)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--dist-suite", action="store_true",
                    help="under torchrun: OUT/ddp, OUT/ddp_resumed, OUT/fsdp_full, OUT/fsdp (the *_resumed / "
                         "fsdp runs crash at their 2nd eval, then resume)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = {"max_steps": args.max_steps, "save_every": args.save_every, "dropout": args.dropout}
    if not args.dist_suite:
        run(args.out, delay=args.delay, resume=args.resume, **kw)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        run(f"{args.out}/ddp", **kw)
        try:
            run(f"{args.out}/ddp_resumed", crash_at_eval=2, **kw)
        except Crash:
            pass
        run(f"{args.out}/ddp_resumed", resume=True, **kw)
        run(f"{args.out}/fsdp_full", fsdp=True, **kw)
        try:
            run(f"{args.out}/fsdp", fsdp=True, crash_at_eval=2, **kw)
        except Crash:
            pass
        run(f"{args.out}/fsdp", fsdp=True, resume=True, **kw)  # a fresh model, everything else from disk
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
