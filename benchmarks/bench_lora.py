"""lorakit vs PEFT, side by side on CPU: one process, identical weights, alternating A/B repetitions.

    python benchmarks/bench_lora.py                # everything, ~10-15 min on 2 cores
    python benchmarks/bench_lora.py --quick        # smoke run: LLaMA config, small shapes, ~1 min
    python benchmarks/bench_lora.py --case forward --model llama --reps 9

Cases (``--case``, repeatable): ``train``, ``forward``, ``decode``, ``switch``. Models are built at random
from configs (no download): GPT-2 small (12 x 768) and a LLaMA-style config (hidden 512, 8 layers, 8 heads,
intermediate 1376, vocab 32000). Every timing is the best of ``--reps`` repetitions in which the variants
run in rotating order (A B C, B C A, ...), so drift in machine speed hits all of them alike; the best,
not the median, because the machine is shared and interference only adds time (medians are logged). Before timing,
lorakit's and PEFT's outputs are checked to agree (the same weights give the same numbers).

Peak memory of a training step is measured in a fresh subprocess per variant: resident set size before
the first step (model, adapter, data ready) is subtracted from the peak RSS over two steps (Linux
``VmHWM``, reset with ``/proc/self/clear_refs`` just before the steps). That counts everything a step
allocates: activations, gradients, optimizer state, allocator slack.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from common import adamw_step, alternate, environment, fmt_ms, in_child, peak_growth_mib
from torch import nn

import lorakit

THREADS = 2


# ----- models ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    train_targets: tuple[str, ...]  # the training / forward case
    decode_targets: tuple[str, ...]  # the many-adapter case


SPECS = {
    "gpt2": Spec("gpt2", ("c_attn",), ("c_attn", "c_proj")),
    "llama": Spec("llama", ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM from a config (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if name == "gpt2":
        config = GPT2Config()  # GPT-2 small: 12 layers x 768, 12 heads, vocab 50257
    else:
        config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                             intermediate_size=1376, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def vocab(model: nn.Module) -> int:
    return model.config.vocab_size


def lorakit_config(targets, r=8, alpha=16) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=r, alpha=alpha, target_modules=list(targets))


def randomize_B(model: nn.Module, seed: int) -> None:
    """B starts at zero; give every adapter a non-zero update so outputs actually depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def peft_twin(base: nn.Module, lk_model: nn.Module, spec_targets, adapters: list[str], r=8, alpha=16):
    """A PEFT model on a deep copy of ``base`` holding the same adapters, with lorakit's exact weights."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(spec_targets),
                          fan_in_fan_out=base.config.model_type == "gpt2")
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    for name in adapters:
        sd = lorakit.lora_state_dict(lk_model, name)
        result = peft.set_peft_model_state_dict(model, sd, adapter_name=name)
        if result.unexpected_keys:
            raise RuntimeError(f"PEFT did not take keys {result.unexpected_keys[:3]}")
    model.set_adapter(adapters[0])
    return model.eval()


def lorakit_model(base: nn.Module, targets, adapters: list[str], r=8, alpha=16, seed=1) -> nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # the same adapters every call
    for name in adapters:
        lorakit.add_lora(model, lorakit_config(targets, r, alpha), adapter=name)
    randomize_B(model, seed=seed)  # A is drawn afresh for every adapter by add_lora
    lorakit.set_adapter(model, adapters[0])
    return model.eval()


def matmul_flops_per_token(model: nn.Module) -> int:
    """2 x (weights of every linear-like layer, lm head included): dense matmul FLOPs per token."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            total += 2 * m.weight.numel()
    return total


def lora_flops_per_token(model: nn.Module, name: str) -> int:
    total = 0
    for layer in lorakit.core.model.lora_layers(model):
        if name in layer.adapters:
            A, B = layer.adapters[name].plain_pair()
            total += 2 * (A.numel() + B.numel())  # r(d+k) multiply-adds
    return total


# ----- timing ----------------------------------------------------------------------------------------------
def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
    if err > tol:
        raise AssertionError(f"{what}: lorakit and PEFT disagree (max rel err {err:.2e})")


# ----- table -----------------------------------------------------------------------------------------------
class Table:
    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cells) -> None:
        self.rows.append(tuple(str(c) for c in cells))
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        head = ("case", "model", "metric", "lorakit", "PEFT", "lorakit/PEFT", "target", "physical limit", "met")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ----- case: training step ---------------------------------------------------------------------------------
def make_train_variant(variant: str, base: nn.Module, spec: Spec) -> nn.Module:
    if variant == "lorakit":
        model = lorakit_model(base, spec.train_targets, ["default"])
    elif variant == "peft":
        lk = lorakit_model(base, spec.train_targets, ["default"])
        model = peft_twin(base, lk, spec.train_targets, ["default"])
    else:  # full fine-tuning
        model = copy.deepcopy(base)
        model.requires_grad_(True)
    return model.train()


def memory_child(variant: str, model_name: str, batch: int, seq: int) -> None:
    """Subprocess entry: peak RSS growth (MiB) of two training steps of one variant, built in place
    (:func:`common.peak_growth_mib`); prints JSON."""
    torch.set_num_threads(THREADS)
    spec, model = SPECS[model_name], build_model(model_name)
    if variant == "lorakit":
        lorakit.add_lora(model, lorakit_config(spec.train_targets))
    elif variant == "peft":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(spec.train_targets),
                              fan_in_fan_out=model_name == "gpt2")
        model = peft.get_peft_model(model, cfg)
    else:
        model.requires_grad_(True)
    randomize_B(model, seed=1)
    model.train()
    ids = torch.randint(0, vocab(model), (batch, seq), generator=torch.Generator().manual_seed(0))
    print(json.dumps({"peak_growth_mib": peak_growth_mib(adamw_step(model, ids, lr=1e-5))}))


def peak_memory(variant: str, model_name: str, batch: int, seq: int) -> float:
    return in_child(__file__, "--_memory-child", variant, model_name, batch, seq)["peak_growth_mib"]


def case_train(table: Table, model_name: str, args) -> None:
    spec, (b, s) = SPECS[model_name], args.train_shape
    base = build_model(model_name)
    models = {v: make_train_variant(v, base, spec) for v in ("lorakit", "peft", "full")}
    ids = torch.randint(0, vocab(base), (b, s), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in models.values():
            m.eval()
        close(models["lorakit"](ids).logits, models["peft"](ids).logits, f"train/{model_name} logits")
        for m in models.values():
            m.train()
    steps = {v: adamw_step(m, ids, lr=1e-5) for v, m in models.items()}
    t = alternate(steps, args.train_reps)
    tok = b * s
    table.add("train step", model_name, f"tokens/s (b{b} x s{s}, r=8)", f"{tok / t['lorakit']:.0f}",
              f"{tok / t['peft']:.0f}", f"{t['peft'] / t['lorakit']:.3f} (speed)", ">= 1", "-", met(t["lorakit"] <= t["peft"] * 1.02))
    ratio_lk, ratio_pf = t["lorakit"] / t["full"], t["peft"] / t["full"]
    table.add("train step", model_name, f"LoRA step / full FT step (full: {fmt_ms(t['full'])})", f"{ratio_lk:.3f}",
              f"{ratio_pf:.3f}", f"{ratio_lk / ratio_pf:.3f}", "<= 0.70", "0.667", met(ratio_lk <= 0.70))
    del models, steps
    mem = {v: peak_memory(v, model_name, b, s) for v in ("lorakit", "peft", "full")}
    table.add("train step", model_name, f"peak RSS growth, MiB (full FT: {mem['full']:.0f})", f"{mem['lorakit']:.0f}",
              f"{mem['peft']:.0f}", f"{mem['lorakit'] / mem['peft']:.3f}", "<= PEFT", "-",
              met(mem["lorakit"] <= mem["peft"] * 1.02))


# ----- case: unmerged / merged forward ---------------------------------------------------------------------
def case_forward(table: Table, model_name: str, args) -> None:
    spec = SPECS[model_name]
    base = build_model(model_name)
    lk = lorakit_model(base, spec.train_targets, ["default"])
    pf = peft_twin(base, lk, spec.train_targets, ["default"])
    merged = lorakit_model(base, spec.train_targets, ["default"])
    merged.load_state_dict(lk.state_dict())
    lorakit.merge(merged)
    frac = lora_flops_per_token(lk, "default") / matmul_flops_per_token(base)
    for b in args.forward_batches:
        ids = torch.randint(0, vocab(base), (b, args.seq), generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            close(lk(ids).logits, pf(ids).logits, f"forward/{model_name} logits")
            close(merged(ids).logits, lk(ids).logits, f"forward/{model_name} merged vs unmerged")
            # overhead = each library against its own wrapped model with adapters off (the same weight
            # tensors, so allocation and alignment are the same); merged against the plain base model
            fns = {"base": lambda ids=ids: base(ids).logits, "lorakit": lambda ids=ids: lk(ids).logits,
                   "lorakit_off": lambda ids=ids: _off(lorakit.disabled(lk), lk, ids),
                   "peft": lambda ids=ids: pf(ids).logits,
                   "peft_off": lambda ids=ids: _off(pf.disable_adapter(), pf, ids),
                   "merged": lambda ids=ids: merged(ids).logits}
            t = alternate(fns, args.forward_reps if b == 1 else args.forward_reps_big)
        o_lk, o_pf = t["lorakit"] / t["lorakit_off"] - 1, t["peft"] / t["peft_off"] - 1
        table.add("unmerged forward", model_name,
                  f"overhead over adapters off, b{b} x s{args.seq} (base {fmt_ms(t['base'])})",
                  f"{o_lk:+.2%}", f"{o_pf:+.2%}", f"{o_lk / o_pf:.2f}" if o_pf > 0 else "-", "<= 0.5x PEFT's",
                  f"{frac:+.2%} (FLOPs)", met(o_lk <= 0.5 * o_pf))
        layer_overhead(table, model_name, base, lk, pf, spec.train_targets[0], b, args)
        o_m = t["merged"] / t["base"] - 1
        table.add("merged forward", model_name, f"vs base, b{b} x s{args.seq}", f"{o_m:+.2%}", "-", "-", "within 2%",
                  "0%", met(abs(o_m) <= 0.02))


def layer_overhead(table: Table, model_name, base, lk, pf, target: str, b: int, args) -> None:
    """The same overhead on one adapted layer alone: resolves differences the whole model's noise hides."""
    path = next(n for n, m in base.named_modules() if n.endswith(target))
    plain, lk_layer = base.get_submodule(path), lk.get_submodule(path)
    pf_layer = pf.base_model.model.get_submodule(path)
    k = plain.weight.shape[1] if isinstance(plain, nn.Linear) else plain.weight.shape[0]
    x = torch.randn(b, args.seq, k, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        close(lk_layer(x), pf_layer(x), f"{path} output")
        t = alternate({"base": lambda: plain(x), "lorakit": lambda: lk_layer(x), "peft": lambda: pf_layer(x)},
                      args.layer_reps)
    o_lk, o_pf = t["lorakit"] / t["base"] - 1, t["peft"] / t["base"] - 1
    d = plain.weight.shape[0] if isinstance(plain, nn.Linear) else plain.weight.shape[1]
    table.add("unmerged forward", model_name, f"one layer ({target}, {k}->{d}), b{b} x s{args.seq} "
              f"(base {fmt_ms(t['base'])})", f"{o_lk:+.2%}", f"{o_pf:+.2%}", f"{o_lk / o_pf:.2f}" if o_pf > 0 else "-",
              "<= 0.5x PEFT's", f"{8 * (k + d) / (k * d):+.2%} (FLOPs)", met(o_lk <= 0.5 * o_pf))


def _off(context, model, ids):
    with context:
        return model(ids).logits


# ----- case: many-adapter decoding -------------------------------------------------------------------------
@torch.inference_mode()
def greedy(model: nn.Module, prompts: torch.Tensor, new_tokens: int, **kw) -> torch.Tensor:
    """Greedy decoding with the KV cache: one prefill, then one token per step for every row."""
    out = model(input_ids=prompts, use_cache=True, **kw)
    past, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], past_key_values=past, use_cache=True, **kw)
        past = out.past_key_values
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def case_decode(table: Table, model_name: str, args) -> None:
    spec, n, new = SPECS[model_name], args.decode_rows, args.new_tokens
    names = [f"a{i}" for i in range(n)]
    base = build_model(model_name)
    lk = lorakit_model(base, spec.decode_targets, names)
    randomize_B(lk, seed=2)
    pf = peft_twin(base, lk, spec.decode_targets, names)
    prompts = torch.randint(0, vocab(base), (n, args.prompt_len), generator=torch.Generator().manual_seed(3))
    shared = [names[0]] * n

    def lk_rows(row_names):
        def run():
            with lorakit.per_row_adapters(lk, row_names):
                return greedy(lk, prompts, new)
        return run

    def lk_single():
        lorakit.set_adapter(lk, names[0])
        return greedy(lk, prompts, new)

    def pf_single():
        pf.set_adapter(names[0])
        return greedy(pf, prompts, new)

    fns = {"lk_rows": lk_rows(names), "lk_shared_rows": lk_rows(shared), "lk_single": lk_single,
           "pf_rows": lambda: greedy(pf, prompts, new, adapter_names=names), "pf_single": pf_single}
    with torch.inference_mode():  # same logits for the first step (greedy tokens may tie-break differently)
        with lorakit.per_row_adapters(lk, names):
            a = lk(prompts).logits
        close(a, pf(prompts, adapter_names=names).logits, f"decode/{model_name} per-row logits")
    t = alternate(fns, args.decode_reps)
    tok = n * new
    frac = lora_flops_per_token(lk, names[0]) / matmul_flops_per_token(base)
    table.add("many-adapter decode", model_name, f"{n} rows x {n} adapters, {new} new tokens: tokens/s",
              f"{tok / t['lk_rows']:.0f}", f"{tok / t['pf_rows']:.0f}", f"{t['pf_rows'] / t['lk_rows']:.2f} (speed)",
              "> 1", "-", met(t["lk_rows"] < t["pf_rows"]))
    r_lk, r_pf = t["lk_rows"] / t["lk_single"], t["pf_rows"] / t["pf_single"]
    table.add("many-adapter decode", model_name,
              f"time {n} adapters / 1 shared adapter (single {fmt_ms(t['lk_single'])} / {fmt_ms(t['pf_single'])})",
              f"{r_lk:.3f}", f"{r_pf:.3f}", f"{r_lk / r_pf:.3f}", "<= 1.10", f"{1 + frac:.3f}", met(r_lk <= 1.10))
    table.add("many-adapter decode", model_name, "time per-row path, all rows one adapter / single",
              f"{t['lk_shared_rows'] / t['lk_single']:.3f}", "-", "-", "-", f"{1 + frac:.3f}", "-")


# ----- case: adapter switch and load ------------------------------------------------------------------------
def case_switch(table: Table, model_name: str, args) -> None:
    spec = SPECS[model_name]
    names = ["a0", "a1"]
    base = build_model(model_name)
    lk = lorakit_model(base, spec.decode_targets, names)
    pf = peft_twin(base, lk, spec.decode_targets, names)
    reps = args.switch_reps

    def lk_switch():
        for _ in range(reps):
            lorakit.set_adapter(lk, "a1")
            lorakit.set_adapter(lk, "a0")

    def pf_switch():
        for _ in range(reps):
            pf.set_adapter("a1")
            pf.set_adapter("a0")

    t = alternate({"lk": lk_switch, "pf": pf_switch}, 5)
    s_lk, s_pf = t["lk"] / (2 * reps), t["pf"] / (2 * reps)
    table.add("adapter switch", model_name, f"set_adapter ({len(list(lorakit.core.model.lora_layers(lk)))} layers)",
              fmt_ms(s_lk), fmt_ms(s_pf), f"{s_lk / s_pf:.3f}", "< 1 ms", "-", met(s_lk < 1e-3))

    with tempfile.TemporaryDirectory() as tmp:
        path = lorakit.save_adapter(lk, tmp, adapter="a0")
        size = os.path.getsize(path / "adapter_model.safetensors")
        counter = iter(range(10**6))

        def lk_load():
            name = f"x{next(counter)}"
            lorakit.load_adapter(lk, path, adapter=name)
            lorakit.delete_adapter(lk, name)

        def pf_load():
            name = f"x{next(counter)}"
            pf.load_adapter(str(path), adapter_name=name)
            pf.delete_adapter(name)

        with torch.no_grad():  # the loaded adapter reproduces the saved one, in both libraries
            ids = torch.randint(0, vocab(base), (1, 16), generator=torch.Generator().manual_seed(0))
            lorakit.load_adapter(lk, path, adapter="check")
            pf.load_adapter(str(path), adapter_name="check")
            pf.set_adapter("check")
            close(lk(ids).logits, pf(ids).logits, "loaded adapter")
            lorakit.delete_adapter(lk, "check")
            pf.set_adapter("a0")
            pf.delete_adapter("check")
            lorakit.set_adapter(lk, "a0")
        t = alternate({"lk": lk_load, "pf": pf_load}, args.load_reps, warmup=2)
    table.add("adapter load", model_name, f"load_adapter {size / 2**20:.2f} MiB + delete", fmt_ms(t["lk"]),
              fmt_ms(t["pf"]), f"{t['lk'] / t['pf']:.3f}", "< 50 ms", "-", met(t["lk"] < 0.05))


CASES = {"train": case_train, "forward": case_forward, "decode": case_decode, "switch": case_switch}
CASE_MODELS = {"train": ("gpt2", "llama"), "forward": ("gpt2", "llama"), "decode": ("llama",), "switch": ("llama",)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", choices=list(CASES), help="repeatable; default: all cases")
    p.add_argument("--model", choices=["gpt2", "llama"], action="append", help="repeatable; default: per case")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the LLaMA config only (unless --model), small shapes, few repetitions")
    p.add_argument("--reps", type=int, help="override the number of timed repetitions of every case")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args._memory_child:
        variant, model_name, b, s = args._memory_child
        return memory_child(variant, model_name, int(b), int(s))
    q = args.quick
    args.train_shape = (2, 64) if q else (8, 128)
    args.seq = 64 if q else 128
    args.forward_batches = (1, 4) if q else (1, 16)
    args.decode_rows, args.prompt_len, args.new_tokens = (8, 8, 8) if q else (32, 16, 32)
    args.train_reps = args.reps or (2 if q else 3)
    args.forward_reps = args.reps or (3 if q else 15)
    args.forward_reps_big = args.reps or (2 if q else 5)
    args.layer_reps = args.reps or (20 if q else 100)
    args.decode_reps = args.reps or (2 if q else 5)
    args.switch_reps, args.load_reps = (20, 5) if q else (200, 21)
    env = environment()
    print(env, flush=True)
    table = Table()
    t0 = time.perf_counter()
    for case in args.case or list(CASES):
        for model_name in args.model or (("llama",) if q else CASE_MODELS[case]):
            print(f"[{time.perf_counter() - t0:6.0f}s] {case} / {model_name}", flush=True)
            CASES[case](table, model_name, args)
    md = f"{env}; command: `python {' '.join(['benchmarks/bench_lora.py'] + (argv or sys.argv[1:]))}`" \
         f" ({time.perf_counter() - t0:.0f} s)\n\n{table.markdown()}\n"
    print("\n" + md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
