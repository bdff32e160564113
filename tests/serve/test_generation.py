"""Generation through the OpenAI routes with the official ``openai`` client: greedy output equals offline
``lorakit generate`` (alone and batched across adapters), chat, streaming, stop, seeds, and continuous
batching (a short request that arrives during a long one finishes first)."""

from __future__ import annotations

import threading

import openai
import pytest

from lorakit.cli.main import main
from lorakit.serve.app import create_app
from lorakit.serve.loading import build_frontend
from tests.serve.conftest import LLAMA_ADAPTERS
from tests.serve.helpers import openai_client, running

PROMPTS = ["the cat sat", "what is two plus two ?"]
MAX = 8


def offline(capsys, llama_dir, adapter_dir, prompts, max_new=MAX) -> list[str]:
    """Continuations printed by ``lorakit generate`` (the prompt removed)."""
    argv = ["generate", "--model", str(llama_dir), "--max-new-tokens", str(max_new)]
    argv += ["--adapter", f"x={adapter_dir}"] if adapter_dir else []
    for p in prompts:
        argv += ["--prompt", p]
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line[len(p):].strip() for line, p in zip(lines, prompts, strict=True)]


def test_greedy_matches_offline_generate_alone_and_batched(server, client, capsys, llama_dir, llama_adapters):
    models = ["llama", *LLAMA_ADAPTERS]  # 3 adapters, LRU of 2: one is evicted and reloaded on the way
    want = {m: offline(capsys, llama_dir, None if m == "llama" else llama_adapters / m, PROMPTS) for m in models}
    assert len({tuple(v) for v in want.values()}) == len(models)  # the adapters really change the output

    def ask(m, p):
        r = client.completions.create(model=m, prompt=p, max_tokens=MAX, temperature=0)
        assert r.usage.completion_tokens == MAX and r.choices[0].finish_reason == "length"
        return r.choices[0].text.strip()

    alone = {m: [ask(m, p) for p in PROMPTS] for m in models}
    assert alone == want
    got: dict = {}
    threads = [threading.Thread(target=lambda m=m, p=p: got.__setitem__((m, p), ask(m, p)))
               for m in models for p in PROMPTS]  # 8 requests, 4 models at once: mixed-adapter batches
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {m: [got[(m, p)] for p in PROMPTS] for m in models} == want


def test_chat_stream_stop_and_seed(client):
    messages = [{"role": "user", "content": "say hi"}]
    full = client.chat.completions.create(model="a", messages=messages, max_tokens=6, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 6 and text
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6

    stop_at = text.split()[1]  # cut before the second word
    r = client.chat.completions.create(model="a", messages=messages, max_tokens=6, temperature=0, stop=[stop_at])
    assert r.choices[0].finish_reason == "stop" and stop_at not in r.choices[0].message.content
    assert text.startswith(r.choices[0].message.content)

    def sample(seed):
        return client.completions.create(model="b", prompt="the", max_tokens=8, temperature=1.5, top_p=0.9,
                                         seed=seed).choices[0].text
    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(2, 6)}) > 1  # sampling at T=1.5 does vary with the seed


def test_short_request_joins_a_long_generation_and_finishes_first(server, client):
    url, engine = server
    order, started = [], threading.Event()

    def long():
        stream = client.completions.create(model="a", prompt="the cat", max_tokens=50, temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                started.set()
        order.append("long")

    def multi_row_steps() -> float:
        """decode steps that ran more than one row, from /metrics"""
        text = openai.DefaultHttpxClient().get(url + "/metrics").text
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("lorakit")}
        return (value['lorakit_batch_size_count{phase="decode"}']
                - value['lorakit_batch_size_bucket{le="1.0",phase="decode"}'])

    before = multi_row_steps()
    t = threading.Thread(target=long)
    t.start()
    assert started.wait(60)
    r = client.completions.create(model="b", prompt="say hi", max_tokens=3, temperature=0)
    order.append("short")
    t.join(60)
    assert r.usage.completion_tokens == 3
    assert order == ["short", "long"]
    assert multi_row_steps() - before >= 2  # the short request's 2 decode steps ran in the long one's batch


def test_unknown_model_is_404_listing_what_exists(client):
    with pytest.raises(openai.NotFoundError, match=r"'nope' does not exist; available: \['llama', 'a', 'b', 'c'\]"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"llama", "a", "b", "c"}
    assert cards["a"].model_extra["rank"] == 2 and cards["c"].model_extra["target_modules"] == ["q_proj"]
    assert sum(cards[n].model_extra["loaded"] for n in LLAMA_ADAPTERS) <= 2  # --max-loaded-adapters 2


def test_idle_engine_leaves_the_model_as_it_found_it(server, client):
    """The entered batch composition is left once nothing runs: another user of the model sees no row plans."""
    import time

    from lorakit.core.model import lora_layers

    _, engine = server
    client.completions.create(model="a", prompt="hi", max_tokens=2, temperature=0)
    deadline = time.monotonic() + 10
    while any(layer.row_plan is not None for layer in lora_layers(engine.model)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(layer.row_plan is None for layer in lora_layers(engine.model))


def test_a_qlora_adapter_is_served_on_the_4bit_base_it_was_trained_on(llama_dir, tmp_path, capsys):
    bnb = pytest.importorskip("bitsandbytes")
    import lorakit
    from lorakit.models import load_model
    from tests.serve.helpers import add_random_adapters

    base = load_model(str(llama_dir), "sft")
    base.config.name_or_path = str(llama_dir)
    lorakit.quantize(base)  # QLoRA: the adapter records its nf4 base
    path = add_random_adapters(base, tmp_path, ["q4"])["q4"]
    want = offline(capsys, llama_dir, path, PROMPTS)  # `lorakit generate` rebuilds the nf4 base too
    front = build_frontend(str(llama_dir), adapters={"q4": path}, max_batch_size=4)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in front.engine.model.modules())
    with running(create_app(front)) as url:
        client = openai_client(url)
        got = [client.completions.create(model="q4", prompt=p, max_tokens=MAX, temperature=0).choices[0].text.strip()
               for p in PROMPTS]
    assert got == want  # the same 4-bit codes and adapter: the same greedy tokens
    full = build_frontend(str(llama_dir), adapters={"q4": path}, quantize="none")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in full.engine.model.modules())
