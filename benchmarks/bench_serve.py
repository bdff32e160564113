"""``lorakit serve`` and its adapter pool, side by side on CPU (one process, rotating repetitions).

    python benchmarks/bench_serve.py --case compose          # per_row_adapters vs the resident pool (~1 min)
    python benchmarks/bench_serve.py --case serve            # engine throughput / latency: mixed vs one adapter vs swap
    python benchmarks/bench_serve.py --case decode_ratio     # per-row / one shared adapter at small models
    python benchmarks/bench_serve.py --case decode_ratio_dora --threads 1   # the same with half the rows DoRA
    python benchmarks/bench_serve.py --case setup            # seconds to add and pool 128 ... 1,000 adapters

Models are random-init LLaMA configs (nothing is downloaded). Every timing is the best (``compose``,
``decode_ratio``) of ``--reps`` repetitions in rotating order, so drift in machine speed hits all variants
alike; the machine is shared and interference only adds time. Figures in docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lorakit

THREADS = 2


def llama(hidden: int, layers: int, vocab: int = 1000, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(hidden // 64, 2)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=hidden * 2 + hidden // 2, vocab_size=vocab,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def add_adapters(model, n: int, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    names = [f"a{i}" for i in range(n)]
    g = torch.Generator().manual_seed(1)
    for name in names:
        lorakit.add_lora(model, lorakit.LoraConfig(r=r, alpha=16, target_modules=list(targets)), adapter=name)
    with torch.no_grad():
        for layer in lorakit.core.model.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.01)
    return names


def rotate(variants: dict, reps: int) -> dict[str, float]:
    """Best time (s) of each variant over ``reps`` rotating rounds."""
    keys = list(variants)
    times = {k: [] for k in keys}
    for rep in range(reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            t = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


# ----- compose: entering a batch composition -------------------------------------------------------------
def case_compose(reps: int) -> dict:
    """The issue's shape: 4-layer 256-wide LLaMA, 32 adapters, 32 prompts x 16 tokens."""
    from lorakit.ops.pool import AdapterPool

    model = llama(256, 4)
    names = add_adapters(model, 32)
    pool = AdapterPool(model, slots=32)
    for name in names:
        pool.add(name)
    ids = torch.randint(1, 1000, (32, 16), generator=torch.Generator().manual_seed(0))
    rows = names  # one adapter per row
    shuffled = names[1:] + names[:1]  # another composition of the same adapters

    splits: dict[str, list[float]] = {}

    def timed(label: str, enter):
        """enter the composition, then two forwards; each phase timed on its own."""
        def run():
            with torch.inference_mode():
                t0 = time.perf_counter()
                with enter():
                    t1 = time.perf_counter()
                    model(input_ids=ids)
                    t2 = time.perf_counter()
                    model(input_ids=ids)
                    t3 = time.perf_counter()
            for phase, dt in (("enter", t1 - t0), ("1st forward", t2 - t1), ("2nd forward", t3 - t2)):
                splits.setdefault(f"{label} {phase}", []).append(dt)
        return run

    rotate({"per_row": timed("per_row_adapters", lambda: lorakit.per_row_adapters(model, rows)),
            "pool": timed("pool.rows", lambda: pool.rows(shuffled)),
            "shared": timed("one shared adapter", lambda: lorakit.use_adapter(model, names[0]))}, reps)
    best = {k: min(v) for k, v in splits.items()}
    return {k: round(v * 1000, 2) for k, v in best.items()}


# ----- serve: the engine under a burst of mixed / single-adapter / swapping traffic ---------------------------
def engine_with(model, names: list[str], max_batch_size: int):
    """An engine over ``model`` whose adapters (already in the model) are all resident in the pool."""
    from lorakit.serve.adapters import AdapterInfo, AdapterStore
    from lorakit.serve.engine import Engine
    from lorakit.serve.metrics import ServeMetrics

    store = AdapterStore(model, "base", {n: AdapterInfo(n, Path(".")) for n in names}, max_loaded=max(len(names), 1))
    for name in names:
        store.pool.add(name)
        store.loaded[name] = None
    return Engine(store, "sft", pad_id=0, max_batch_size=max_batch_size, metrics=ServeMetrics())


class _Sink:
    """A job's results on the engine thread: ``on_final(event)`` at its last event (token ids only: the
    benchmark times the engine, not detokenisation)."""

    def __init__(self, on_final):
        self.on_final = on_final

    def put(self, event) -> None:
        from lorakit.serve.jobs import FINAL

        if isinstance(event, FINAL):
            self.on_final(event)


def _forwards(engine) -> dict[str, tuple[float, float]]:
    """(forwards, rows) so far per phase, from the engine's Prometheus batch-size histogram."""
    get = engine.metrics.registry.get_sample_value
    return {phase: (get("lorakit_batch_size_count", {"phase": phase}) or 0,
                    get("lorakit_batch_size_sum", {"phase": phase}) or 0) for phase in ("prefill", "decode")}


def burst(engine, adapters: list[str], prompt_len: int, max_tokens: int) -> dict:
    """Submit one request per entry of ``adapters`` at once; tokens/s, p50/p99 latency (ms), and how the
    engine batched them (forwards and mean rows per forward, prefill and decode)."""
    import threading

    from lorakit.serve.jobs import CommandJob, Failed, GenJob

    done_at: dict[int, float] = {}
    jobs: list = []
    errors: list[str] = []
    all_done = threading.Event()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 1000, (prompt_len,), generator=g).tolist() for _ in adapters]
    # The whole burst is queued while the engine waits at a gate, so every variant starts from the same
    # batching (max_batch_size rows prefilled at once). Submitted one by one, the engine woke mid-loop and
    # split the first wave into prefills of varying size, differently from run to run.
    gate = threading.Event()
    engine.submit(CommandJob(gate.wait, _Sink(lambda event: None)))
    before = _forwards(engine)
    t0 = time.perf_counter()
    for i, (name, ids) in enumerate(zip(adapters, prompts, strict=True)):
        def on_final(event, i=i):
            if isinstance(event, Failed):
                errors.append(event.error.message)
            done_at[i] = time.perf_counter()
            if len(done_at) == len(adapters):
                all_done.set()
        jobs.append(GenJob(name, ids, max_tokens, _Sink(on_final)))
        engine.submit(jobs[-1])
    gate.set()
    all_done.wait()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    lat = sorted((t - t0) * 1000 for t in done_at.values())
    after = _forwards(engine)
    batching = {}
    for phase in after:
        n, rows = (after[phase][0] - before[phase][0]), (after[phase][1] - before[phase][1])
        batching[phase] = f"{n:.0f} x {rows / max(n, 1):.1f} rows"
    return {"tok/s": round(sum(len(job.generated) for job in jobs) / wall, 1), "p50 ms": round(lat[len(lat) // 2]),
            "p99 ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))]), **batching}


def case_serve(reps: int, counts=(1, 8, 32, 128, 1000), requests: int = 128, batch: int = 32) -> dict:
    """4-layer 256-wide LLaMA, r=8 on q,k,v,o; a burst of ``requests`` (16-token prompts, 16 new tokens)."""
    out = {}
    for n in counts:
        out[n] = _serve_at(n, reps, requests, batch)
        print(n, json.dumps(out[n]), flush=True)
    return out


def _serve_at(n: int, reps: int, requests: int, batch: int) -> dict:
    t0 = time.perf_counter()
    model = llama(256, 4)
    # no end-of-sequence token: every request generates max_tokens, so each variant does the same work and
    # batches the same way (with LlamaConfig's eos id 2, a few greedy outputs stopped early, which ones
    # depending on the adapters, and freed rows refilled by smaller prefills)
    model.config.eos_token_id = None
    names = add_adapters(model, n)
    t_added = time.perf_counter()
    mixed = [names[i % n] for i in range(requests)]
    single = [names[0]] * requests
    batched, swapping = engine_with(model, names, batch), engine_with(model, names, 1)
    t_setup = time.perf_counter()
    batched.start()
    swapping.start()
    try:
        burst(batched, mixed[:batch], 16, 4)  # warm-up
        runs = {"mixed": lambda: burst(batched, mixed, 16, 16), "single": lambda: burst(batched, single, 16, 16),
                "swap": lambda: burst(swapping, mixed[:requests // 4], 16, 16)}  # a quarter: it is slow
        res = {k: [] for k in runs}
        for rep in range(reps):
            for k in list(runs)[rep % 3:] + list(runs)[:rep % 3]:
                res[k].append(runs[k]())
        best = {k: max(v, key=lambda r: r["tok/s"]) for k, v in res.items()}
        best["mixed / single"] = round(best["mixed"]["tok/s"] / best["single"]["tok/s"], 3)
        # the same ratio round by round (each round runs both, seconds apart): its spread shows the noise
        best["mixed / single by round"] = [round(m["tok/s"] / s["tok/s"], 2)
                                           for m, s in zip(res["mixed"], res["single"], strict=True)]
        best["mixed / swap"] = round(best["mixed"]["tok/s"] / best["swap"]["tok/s"], 1)
        best["set-up s"] = {"add_lora": round(t_added - t0, 1), "pools": round(t_setup - t_added, 1)}
        best["runs s"] = round(time.perf_counter() - t_setup, 1)
        return best
    finally:
        batched.stop()
        swapping.stop()


# ----- setup: adding n adapters to the model and stacking them in the pool ----------------------------------
def case_setup(reps: int, counts=(128, 256, 512, 1000)) -> dict:
    """Seconds to add ``n`` adapters with ``add_lora`` (4-layer 256-wide LLaMA, r=8 on q,k,v,o) and to stack
    them into an :class:`AdapterPool`; one repetition (it is long at 1,000)."""
    from lorakit.ops.pool import AdapterPool

    out = {}
    for n in counts:
        model = llama(256, 4)
        t0 = time.perf_counter()
        names = add_adapters(model, n)
        t1 = time.perf_counter()
        pool = AdapterPool(model, slots=n)
        for name in names:
            pool.add(name)
        out[n] = {"add_lora s": round(t1 - t0, 1), "pool.add s": round(time.perf_counter() - t1, 1)}
        print(n, out[n], flush=True)
    return out


# ----- decode ratio: per-row / one shared adapter at small models ------------------------------------------
def case_decode_ratio(reps: int) -> dict:
    """One decode step (KV cache of 32 tokens) with a distinct adapter per row (pool) vs one shared adapter."""
    return _over_sizes(_ratio_at, reps)


def _over_sizes(ratio_at, reps: int) -> dict:
    """``ratio_at(hidden, layers, rows, reps)`` at each small model size and row count, printed as it goes."""
    out = {}
    for hidden, layers in ((64, 2), (128, 2), (256, 4), (512, 4)):
        for rows in (8, 32):
            key = f"hidden {hidden} x {layers} layers, {rows} rows"
            out[key] = ratio_at(hidden, layers, rows, reps)
            print(key, out[key], flush=True)
    return out


def _decode_steps(model, rows: int):
    """``step(ctx)`` -> a callable running 8 decode steps of ``rows`` rows (32-token cache) inside ``ctx()``."""
    from lorakit.serve import batch as B

    ids = torch.randint(1, 1000, (rows, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = B.cache_tensors(B.output_cache(model(input_ids=ids, use_cache=True)))
    arg = B.cache_argument(model)
    step_ids, mask, pos = ids[:, -1:], torch.ones(rows, 33, dtype=torch.long), torch.full((rows, 1), 32)

    def step(ctx):
        def run():
            with torch.no_grad(), ctx():
                for _ in range(8):
                    model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                          use_cache=True, **{arg: B.make_cache(cache)})
        return run

    return step


def _ratio_at(hidden: int, layers: int, rows: int, reps: int) -> float:
    from lorakit.ops.pool import AdapterPool

    model = llama(hidden, layers)
    names = add_adapters(model, rows)
    pool = AdapterPool(model, slots=rows)
    for name in names:
        pool.add(name)
    step = _decode_steps(model, rows)
    best = rotate({"per-row": step(lambda: pool.rows(names)),
                   "shared": step(lambda: lorakit.use_adapter(model, names[0]))}, reps)
    return round(best["per-row"] / best["shared"], 3)


# ----- decode ratio with DoRA rows in the mix ------------------------------------------------------------------
def case_decode_ratio_dora(reps: int) -> dict:
    """As ``decode_ratio``, with every other row's adapter a DoRA adapter (the pool applies its per-output
    factors, computed once at ``add``), against every row on one shared plain adapter and on one shared DoRA
    adapter (``use_adapter``: DoRA recomputes its row norms per forward, as PEFT's does)."""
    return _over_sizes(_dora_ratio_at, reps)


def _dora_ratio_at(hidden: int, layers: int, rows: int, reps: int) -> dict[str, float]:
    from lorakit.ops.pool import AdapterPool
    from lorakit.variants.dora import DoraAdapter

    model = llama(hidden, layers)
    names = [f"a{i}" for i in range(rows)]
    for i, name in enumerate(names):
        cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 use_dora=i % 2 == 1)
        lorakit.add_lora(model, cfg, adapter=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lorakit.core.model.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.01)
                if isinstance(adapter, DoraAdapter):
                    adapter.lora_magnitude_vector.mul_(1.1)
    pool = AdapterPool(model, slots=rows)
    for name in names:
        pool.add(name)
    step = _decode_steps(model, rows)
    best = rotate({"per-row": step(lambda: pool.rows(names)),
                   "shared plain": step(lambda: lorakit.use_adapter(model, names[0])),
                   "shared dora": step(lambda: lorakit.use_adapter(model, names[1]))}, reps)
    return {"per-row / shared plain": round(best["per-row"] / best["shared plain"], 3),
            "per-row / shared DoRA": round(best["per-row"] / best["shared dora"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=sorted(CASES))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads (1 is far steadier on a shared machine: docs/serving.md)")
    p.add_argument("--counts", help="serve, setup: numbers of adapters (default 1,8,32,128,1000 and 128,256,512,1000)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for case in args.case or ["compose", "decode_ratio", "serve"]:
        extra = {"counts": [int(c) for c in args.counts.split(",")]} if args.counts and case in ("serve", "setup") else {}
        results[case] = CASES[case](args.reps, **extra)
        print(json.dumps({case: results[case]}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


CASES = {"compose": case_compose, "serve": case_serve, "decode_ratio": case_decode_ratio, "setup": case_setup,
         "decode_ratio_dora": case_decode_ratio_dora}

if __name__ == "__main__":
    sys.exit(main())
