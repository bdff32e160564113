"""A multi-task classification server: adapters whose heads differ (2 classes, 3 classes, a regression head)
on one base, in one forward; each row gets its own head's classes (with names) or value, equal to its
adapter's offline output."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from lorakit.models import load_with_adapter
from lorakit.serve.app import create_app
from lorakit.serve.jobs import CommandJob
from lorakit.serve.loading import build_frontend
from tests.serve.helpers import running
from tests.serve.helpers_heads import HEADS, save_heads

TEXTS = {"nli": ["a dog ran", "the cat sat on a mat"], "sst": ["what a film"], "stsb": ["two plus two", "four"]}
TOL = 1e-5  # float32, same weights: the server's batch only pads and reorders reductions


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    return save_heads(tmp_path_factory.mktemp("heads"))


def offline(base, root, name: str) -> list[list[float]]:
    model, tok, _ = load_with_adapter(root / name, model=str(base))
    with torch.no_grad():
        logits = model(**tok(TEXTS[name], return_tensors="pt", padding=True)).logits.float()
    return (logits if logits.shape[1] == 1 else torch.softmax(logits, -1)).tolist()


def test_three_heads_in_one_forward_each_as_offline(heads):
    base, root = heads
    want = {name: offline(base, root, name) for name in HEADS}
    front = build_frontend(str(base), adapters_dir=root)
    engine, compositions = front.engine, []
    set_rows = engine._set_rows
    engine._set_rows = lambda names: (compositions.append(names), set_rows(names))[1]
    got = {}
    with running(create_app(front)) as url, httpx.Client(base_url=url, timeout=60) as http:
        gate = threading.Event()
        engine.submit(CommandJob(gate.wait, type("Sink", (), {"put": lambda self, e: None})()))
        threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, http.post(
            "/v1/classify", json={"model": n, "input": TEXTS[n]}))) for n in HEADS]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine.incoming.qsize() < len(HEADS) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()  # the three requests are queued: one batch
        for t in threads:
            t.join(60)
        cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert any(set(c or []) == set(HEADS) for c in compositions)  # one forward held all three adapters
    for name, labels in HEADS.items():
        assert got[name].status_code == 200, got[name].text
        data = got[name].json()["data"]
        assert len(data) == len(TEXTS[name])
        for item, ref in zip(data, want[name], strict=True):
            if labels is None:  # regression: the head's value
                assert item["num_classes"] == 1 and item["probs"] is None and item["label"] is None
                assert abs(item["value"] - ref[0]) <= TOL
            else:
                assert item["num_classes"] == len(labels) and len(item["probs"]) == len(labels)
                assert max(abs(a - b) for a, b in zip(item["probs"], ref, strict=True)) <= TOL
                assert item["label"] == labels[max(range(len(ref)), key=ref.__getitem__)]
        assert cards[name]["num_classes"] == (1 if labels is None else len(labels))
        assert cards[name]["labels"] == labels and cards[name]["untrained_head"] is False
    # the base's head took the first adapter's shape (3 classes); its checkpoint had 2: drawn, never trained
    assert cards["bert"]["num_classes"] == 3 and cards["bert"]["untrained_head"] is True
