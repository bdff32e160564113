"""``lorakit serve`` measured through HTTP, as a client sees it, beside transformers' own batched ``generate()``.

    python benchmarks/bench_serve_http.py                 # ~3 min on a quiet 2-core machine
    python benchmarks/bench_serve_http.py --reps 5 --out results.json

A random-init LLaMA (hidden 256, 4 layers, vocab 1,000, no end-of-sequence token: every request runs to
``max_tokens``) and ``--adapters`` random adapters (r=8 on q,k,v,o) are saved to a temporary folder; the
server runs in a subprocess (``lorakit serve``, ``--max-batch-size`` = clients) with one torch thread, and
``--clients`` concurrent clients (aiohttp, asyncio, in this process) each send one ``/v1/completions`` request:
a 16-word text prompt, ``max_tokens`` 32, greedy, ``ignore_eos`` (as vLLM's benchmark clients send it).
The clients share one connection pool kept open across rounds, as vLLM's benchmark client (aiohttp) and the
``openai`` client do (the warm-up opens the connections; the server runs with ``--timeout-keep-alive 60``).
aiohttp, not httpx: httpx 0.29's pool took 2-3 s to send 64 concurrent requests on reused connections to a
bare FastAPI route (0.4 s on new connections); aiohttp took 0.12 s.
Variants, in rotating order each round:

- ``generate``: ``model.generate()`` of transformers on the same base weights, all prompts in one batch
  (left-padded), one thread, greedy, ``max_new_tokens`` 32: the throughput a batched offline run reaches;
- ``engine``: the server's engine in this process, no HTTP: the same 64 requests (token ids) queued at once
  (``bench_serve.burst``); ``base / engine`` is what HTTP and the event loop cost;
- ``base``: every request names the base model;
- ``base_new_connections``: the same, but each request opens a new connection (a fresh client per burst):
  what the connection setup costs;
- ``single``: every request names the same adapter;
- ``mixed``: request ``i`` names adapter ``i % adapters``.

Throughput is generated tokens / wall seconds from the first request sent to the last answer received.
Each ratio is reported best-of-rounds and round by round (the variants of a round run seconds apart), so the
spread shows the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_serve  # noqa: E402
from bench_serve import add_adapters, llama  # noqa: E402

PROMPT_WORDS = 16


def word_tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` entries (``w3`` ... ``w999``; pad/unk/eos first): one token a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def save_setup(root: Path, adapters: int) -> tuple[Path, Path, list[str]]:
    import lorakit

    model = llama(256, 4)
    model.config.eos_token_id = None  # every request generates max_tokens: the same work in every variant
    model.config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / "base")
    word_tokenizer(model.config.vocab_size).save_pretrained(root / "base")
    names = add_adapters(model, adapters)
    for name in names:
        lorakit.save_adapter(model, root / "adapters", adapter=name)
    return root / "base", root / "adapters", names


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (PROMPT_WORDS,), generator=g).tolist() for _ in range(n)]


def start_server(base: Path, adapters: Path, port: int, batch: int, n_adapters: int, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = ["-m", "lorakit.cli.main"] if not os.environ.get("BENCH_SERVER_LAUNCHER") else \
        [os.environ["BENCH_SERVER_LAUNCHER"]]  # e.g. a script that profiles the server
    cmd = [sys.executable, *launcher, "serve", "--model", str(base), "--adapters-dir", str(adapters),
           "--port", str(port), "--max-batch-size", str(batch), "--max-loaded-adapters", str(n_adapters),
           "--timeout-keep-alive", "60"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError("the server exited (its log follows)")
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the server did not start in 120 s")


def pool(clients: int):
    """An aiohttp session with ``clients`` connections kept alive (idle ones expire before the server's 60 s)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=30)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


async def burst(url: str, models: list[str], texts: list[str], max_tokens: int, session=None) -> float:
    """All requests at once, on ``session``'s pooled connections (None: a new session, new connections);
    generated tokens per second from the first send to the last answer."""
    if session is not None:
        return await _timed(session, url, models, texts, max_tokens)
    async with pool(len(models)) as fresh:
        return await _timed(fresh, url, models, texts, max_tokens)


async def _timed(session, url: str, models: list[str], texts: list[str], max_tokens: int) -> float:
    async def one(model, text):
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        async with session.post(url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            return (await r.json())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(m, t) for m, t in zip(models, texts, strict=True)))
    wall = time.perf_counter() - t0
    if sum(tokens) != len(models) * max_tokens:
        raise RuntimeError(f"{sum(tokens)} tokens generated, expected {len(models) * max_tokens}")
    return sum(tokens) / wall


def generate_throughput(model, ids: list[list[int]], max_tokens: int) -> float:
    batch = torch.tensor(ids)  # every prompt has PROMPT_WORDS tokens: no padding needed
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)
    wall = time.perf_counter() - t0
    assert out.shape == (len(ids), PROMPT_WORDS + max_tokens)
    return len(ids) * max_tokens / wall


async def rounds(args, url: str, offline, engine, ids: list[list[int]], names: list[str]) -> dict[str, list[float]]:
    """Warm-up, then ``args.reps`` rounds of every variant in rotating order; tok/s per variant per round."""
    texts = [" ".join(f"w{i}" for i in row) for row in ids]
    models = {"base": ["base"] * args.clients, "single": [names[0]] * args.clients,
              "mixed": [names[i % len(names)] for i in range(args.clients)]}

    async def variant(k, session):
        if k == "generate":
            return generate_throughput(offline, ids, args.tokens)
        if k == "engine":
            return bench_serve.burst(engine, [None] * args.clients, PROMPT_WORDS, args.tokens)["tok/s"]
        if k == "base_new_connections":
            return await burst(url, models["base"], texts, args.tokens)
        return await burst(url, models[k], texts, args.tokens, session)

    keys = ["generate", "engine", "base", "base_new_connections", "single", "mixed"]
    async with pool(args.clients) as session:
        for k in keys:  # warm-up: loads every adapter, opens the pool's connections, first-call costs
            await variant(k, session)
        return await _rounds(args, keys, lambda k: variant(k, session))


async def _rounds(args, keys: list[str], variant) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(args.reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            res[k].append(await variant(k))
        print(rep, {k: round(v[-1], 1) for k, v in res.items()}, flush=True)
    return res


RATIOS = [("base", "generate"), ("engine", "generate"), ("base", "engine"), ("base_new_connections", "generate"),
          ("mixed", "single")]


def run(args) -> dict:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters_dir, names = save_setup(Path(tmp), args.adapters)
        offline = LlamaForCausalLM.from_pretrained(base).eval()
        engine = bench_serve.engine_with(LlamaForCausalLM.from_pretrained(base).eval(), [], args.clients)
        ids = prompts(args.clients, offline.config.vocab_size)
        url = f"http://127.0.0.1:{args.port}"
        log = open(Path(tmp) / "server.log", "w+b")  # noqa: SIM115 -- read back on failure
        proc = start_server(base, adapters_dir, args.port, args.clients, args.adapters, log)
        engine.start()
        try:
            asyncio.run(wait_ready(url, proc))
            res = asyncio.run(rounds(args, url, offline, engine, ids, names))
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            engine.stop(30)
            proc.terminate()
            proc.wait(30)
            log.close()
    best = {k: round(max(v), 1) for k, v in res.items()}
    out = {"tok/s best": best, "tok/s by round": {k: [round(x, 1) for x in v] for k, v in res.items()}}
    for a, b in RATIOS:
        out[f"{a} / {b}"] = round(best[a] / best[b], 3)
        out[f"{a} / {b} by round"] = [round(x / y, 3) for x, y in zip(res[a], res[b], strict=True)]
    return {**out, "load average": os.getloadavg(), "config": vars(args)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent requests (and the server's batch size)")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--adapters", type=int, default=8, help="adapters served; mixed traffic cycles through them")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    out = run(args)
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
