"""/v1/classify on a tiny BERT with three adapters: vLLM's response shape, the adapters' class names, inputs of
several adapters batched in one forward and equal to each adapter alone, and its bad input."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

import lorakit
from lorakit.models import load_model, load_tokenizer
from tests.serve.conftest import LABELS
from tests.serve.helpers import serving

TEXTS = ["a great movie", "awful", "it was fine"]


def test_classify_across_adapters(bert_dir, bert_adapters):
    model, tok = load_model(str(bert_dir), "classification", label_names=LABELS).eval(), load_tokenizer(str(bert_dir))
    want = {}
    with torch.no_grad():
        for name in ("x", "y", "z"):
            lorakit.load_adapter(model, bert_adapters / name, adapter=name)
            want[name] = torch.softmax(model(**tok(TEXTS, return_tensors="pt", padding=True)).logits, -1)
    with serving(bert_dir, bert_adapters, max_batch_size=16) as (url, _):
        got = {}

        def ask(name):
            got[name] = httpx.post(url + "/v1/classify", json={"model": name, "input": TEXTS}, timeout=60).json()

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("x", "y", "z")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, body in got.items():
            assert body["object"] == "list" and body["model"] == name and body["usage"]["prompt_tokens"] > 0
            assert [d["index"] for d in body["data"]] == [0, 1, 2]
            probs = torch.tensor([d["probs"] for d in body["data"]])
            # the server pads a mixed batch differently: rounding only (~1e-7); a wrong adapter differs by ~1e-1
            torch.testing.assert_close(probs, want[name], rtol=0, atol=1e-5)
            assert [d["label"] for d in body["data"]] == [LABELS[i] for i in want[name].argmax(-1).tolist()]
            assert all(d["num_classes"] == 3 for d in body["data"])
        assert len({tuple(b["data"][0]["probs"]) for b in got.values()}) == 3
        single = httpx.post(url + "/v1/classify", json={"model": "y", "input": "awful"}).json()
        torch.testing.assert_close(torch.tensor(single["data"][0]["probs"]), want["y"][1], rtol=0, atol=1e-5)

        for body, field in [({"model": "y", "input": []}, "input"), ({"model": "y", "input": ["ok", ""]}, "input"),
                            ({"model": "y", "input": ["a"] * 257}, "input"), ({"model": "y"}, "input"),
                            ({"model": "y", "input": 3}, "input")]:
            r = httpx.post(url + "/v1/classify", json=body)
            assert r.status_code == 422 and r.json()["error"]["param"].startswith(field), r.text
        r = httpx.post(url + "/v1/classify", json={"model": "y", "input": "word " * 100})
        assert r.status_code == 400 and "the model's context is 64" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "y", "prompt": "hi"})
        assert r.status_code == 400 and "use /v1/classify" in r.json()["error"]["message"]
        with pytest.raises(httpx.HTTPStatusError, match="404"):
            httpx.post(url + "/v1/classify", json={"model": "w", "input": "hi"}).raise_for_status()
