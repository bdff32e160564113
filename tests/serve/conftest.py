"""Saved tiny models and adapters shared by the serve tests, and one running server over them (each built once
per session)."""

from __future__ import annotations

import pytest

from tests.serve.helpers import openai_client, save_adapters, save_bert, save_llama, serving
from tests.serve.helpers_json import save_json_llama

pytest.importorskip("fastapi")
pytest.importorskip("openai")

LLAMA_ADAPTERS = ["a", "b", "c"]
LABELS = ["neg", "neu", "pos"]


def _adapters_dir(tmp_path_factory, label: str, model_dir, names: list[str], **kwargs):
    """A fresh folder ``label`` holding the adapters ``names`` of the model in ``model_dir``
    (:func:`~tests.serve.helpers.save_adapters`)."""
    root = tmp_path_factory.mktemp(label)
    save_adapters(model_dir, root, names, **kwargs)
    return root


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="session")
def llama_adapters(llama_dir, tmp_path_factory):
    """Three causal-LM adapters (ranks 2, 3, 4; c on q_proj only) under one adapters dir."""
    return _adapters_dir(tmp_path_factory, "llama_adapters", llama_dir, LLAMA_ADAPTERS)


@pytest.fixture(scope="session")
def server(llama_dir, llama_adapters):
    """The LLaMA with its three adapters on 127.0.0.1 (a :class:`~tests.serve.helpers.Served`): two adapters
    loaded at a time (so one is evicted and reloaded along the way), batches of up to 8 rows. Shared by every
    module that only sends it requests; a module that loads adapters, patches the engine or needs other
    limits overrides ``server`` (and ``client``) with its own."""
    with serving(llama_dir, llama_adapters, max_loaded=2, max_batch_size=8) as served:
        yield served


@pytest.fixture(scope="session")
def client(server):
    """The ``openai`` client of :func:`server`."""
    return openai_client(server.url)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return save_bert(tmp_path_factory.mktemp("bert") / "bert", num_labels=len(LABELS))


@pytest.fixture(scope="session")
def bert_adapters(bert_dir, tmp_path_factory):
    return _adapters_dir(tmp_path_factory, "bert_adapters", bert_dir, ["x", "y", "z"], task="classification",
                         labels=LABELS)


@pytest.fixture(scope="session")
def json_llama(tmp_path_factory):
    """A LLaMA whose byte-level tokenizer can write any JSON (:mod:`tests.serve.helpers_json`)."""
    return save_json_llama(tmp_path_factory.mktemp("json_llama") / "jl")


@pytest.fixture(scope="session")
def json_adapters(json_llama, tmp_path_factory):
    return _adapters_dir(tmp_path_factory, "json_adapters", json_llama, ["a", "b"])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread. On a shared, oversubscribed machine two spinning OpenMP threads
    make each tiny matmul ~50x slower; results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
