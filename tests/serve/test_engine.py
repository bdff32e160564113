"""The engine's scheduling (``serve/engine.py``), driven directly with token ids: no HTTP."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.serve.adapters import AdapterStore
from lorakit.serve.engine import Engine
from lorakit.serve.jobs import FINAL, Failed, GenJob


class _Done:
    """A job's results: counts its final event."""

    def __init__(self, finished: threading.Semaphore):
        self.finished, self.error = finished, None

    def put(self, event) -> None:
        if isinstance(event, Failed):
            self.error = event.error
        if isinstance(event, FINAL):
            self.finished.release()


def _count(engine: Engine, phase: str) -> float:
    return engine.metrics.registry.get_sample_value("lorakit_batch_size_count", {"phase": phase}) or 0


def _engine(max_batch_size: int, gather_s: float, gather_max_s: float) -> Engine:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return Engine(AdapterStore(model, "base", {}, max_loaded=1), "sft", max_batch_size=max_batch_size,
                  gather_s=gather_s, gather_max_s=gather_max_s)


def _run(engine: Engine, count: int, apart_s: float, timeout: float) -> list[_Done]:
    """Submit ``count`` 4-token generations ``apart_s`` apart; wait for every answer (``timeout`` each)."""
    engine.start()
    finished = threading.Semaphore(0)
    sinks = [_Done(finished) for _ in range(count)]
    try:
        for i, sink in enumerate(sinks):
            engine.submit(GenJob(None, [1 + i, 2, 3], 4, sink))
            time.sleep(apart_s)
        for _ in sinks:
            assert finished.acquire(timeout=timeout), "a request was not answered in time"
    finally:
        engine.stop(30)
    assert [s.error for s in sinks] == [None] * count
    return sinks


def test_an_idle_engine_gathers_requests_that_keep_coming_into_one_prefill():
    # long gather windows, so that a loaded machine's scheduling cannot split the burst: 6 requests 10 ms
    # apart all arrive within 1 s of each other
    engine = _engine(max_batch_size=8, gather_s=1.0, gather_max_s=30.0)
    _run(engine, 6, apart_s=0.01, timeout=60)
    assert _count(engine, "prefill") == 1  # without gathering, the first request is prefilled alone
    assert _count(engine, "decode") == 3  # 4 tokens: one from the prefill, three decode steps for all 6 rows


def test_gathering_stops_when_a_batch_is_full():
    # windows of a minute: only a full batch (3 rows) lets the engine start before the 20 s answer timeout
    engine = _engine(max_batch_size=3, gather_s=60.0, gather_max_s=60.0)
    _run(engine, 3, apart_s=0.0, timeout=20)
    assert _count(engine, "prefill") == 1


@pytest.mark.parametrize("name, value", [("gather_s", -0.1), ("gather_max_s", float("nan")),
                                         ("gather_s", float("inf")), ("gather_s", "5"), ("gather_max_s", True)])
def test_a_bad_gather_window_is_refused_by_name(name, value):
    windows = {"gather_s": 0.0, "gather_max_s": 0.0, name: value}
    with pytest.raises(ValueError, match=f"^Engine {name} must be a finite number of seconds >= 0, got "):
        _engine(max_batch_size=1, **windows)
