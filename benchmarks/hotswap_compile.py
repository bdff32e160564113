"""Hot-swapping under torch.compile (inductor, CPU): recompilations and the time of a swap.

A tiny random LLaMA (2 layers, hidden 64) with LoRA on q/k/v/o is prepared for rank 16 and compiled once with
inductor; five adapters of ranks 4, 8 and 16 with varied alphas are swapped in. Printed: dynamo's unique graphs
and recompiles (goal: 1 graph, 0 recompiles), the first compile, each swap + forward, and the largest difference
from the eager model. ``torch.set_num_threads(1)`` so the figures are steady on a shared machine.

    PYTHONPATH=src python benchmarks/hotswap_compile.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo as dynamo
import transformers

import lorakit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def saved(tmp: Path, i: int, r: int, alpha: float) -> Path:
    model = lorakit.add_lora(base(), lorakit.LoraConfig(r=r, alpha=alpha, target_modules=TARGETS))
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lorakit.save_adapter(model, tmp / f"a{i}")


def eager(path: Path, x: torch.Tensor) -> torch.Tensor:
    model = base()
    lorakit.load_adapter(model, path)
    with torch.no_grad():
        return model(x).logits


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    swaps = [(4, 8.0), (16, 3.0), (8, 32.0), (4, 1.5), (16, 16.0)]
    paths = [saved(tmp, i, r, a) for i, (r, a) in enumerate([(8, 16.0), *swaps])]
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model = base()
    lorakit.load_adapter(model, paths[0])
    lorakit.prepare_for_hotswap(model, max_rank=16)
    dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        t = time.perf_counter()
        compiled(x)
        print(f"first compile + forward: {time.perf_counter() - t:.1f} s")
        worst = 0.0
        with dynamo.config.patch(error_on_recompile=True):
            for path, (r, a) in zip(paths[1:], swaps, strict=True):
                t = time.perf_counter()
                lorakit.hotswap_adapter(compiled, path)
                out = compiled(x).logits
                dt = time.perf_counter() - t
                diff = (out - eager(path, x)).abs().max().item()
                worst = max(worst, diff)
                print(f"swap to r={r:2d} alpha={a:4.1f}: swap + forward {1000 * dt:7.1f} ms, max |compiled - eager| "
                      f"{diff:.2e}")
    print(f"unique graphs {dynamo.utils.counters['stats']['unique_graphs']}, recompiles "
          f"{sum(dynamo.utils.counters['recompiles'].values())}, largest difference {worst:.2e}")


if __name__ == "__main__":
    main()
