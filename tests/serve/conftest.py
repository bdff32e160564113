"""Saved tiny models and adapters shared by the serve tests (built once per session)."""

from __future__ import annotations

import pytest

from tests.serve.helpers import save_adapters, save_bert, save_llama

pytest.importorskip("fastapi")
pytest.importorskip("openai")

LLAMA_ADAPTERS = ["a", "b", "c"]
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="session")
def llama_adapters(llama_dir, tmp_path_factory):
    """Three causal-LM adapters (ranks 2, 3, 4; c on q_proj only) under one adapters dir."""
    root = tmp_path_factory.mktemp("llama_adapters")
    save_adapters(llama_dir, root, LLAMA_ADAPTERS)
    return root


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return save_bert(tmp_path_factory.mktemp("bert") / "bert", num_labels=len(LABELS))


@pytest.fixture(scope="session")
def bert_adapters(bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_adapters")
    save_adapters(bert_dir, root, ["x", "y", "z"], task="classification", labels=LABELS)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread. On a shared, oversubscribed machine two spinning OpenMP threads
    make each tiny matmul ~50x slower; results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
