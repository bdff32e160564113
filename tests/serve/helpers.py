"""Tiny saved models and adapters for the serve tests, and a real server on a loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

import lorakit
from tests.conftest import save_random
from tests.train.helpers_tokenizer import minilm_tokenizer, tiny_tokenizer


def save_llama(path: Path, layers: int = 2, hidden: int = 32, ctx: int = 64) -> Path:
    """A random-init LLaMA + the tiny word-level tokenizer (with a chat template) in ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(chat_template=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * hidden, vocab_size=len(tok), max_position_embeddings=ctx,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # special tokens (EOS among them) never win: continuations run to max_tokens
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[tok.all_special_ids] = 0.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_bert(path: Path, num_labels: int = 3) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=tok.vocab_size, max_position_embeddings=64, num_labels=num_labels)
    return save_random(path, BertForSequenceClassification, cfg, tok)


def add_random_adapters(model, out: Path, names: list[str], task: str = "sft") -> dict[str, Path]:
    """Add one random adapter per name to ``model`` (different ranks and targets) and save each as
    ``out/<name>``; the adapters stay in ``model`` (an offline reference)."""
    from lorakit.core.model import lora_layers

    paths = {}
    for i, name in enumerate(names):
        targets = ["q_proj", "v_proj"] if task == "sft" else ["query", "value"]
        if i % 3 == 2:
            targets = targets[:1]
        extra = {"modules_to_save": ["classifier"], "task_type": "SEQ_CLS"} if task == "classification" else \
            {"task_type": "CAUSAL_LM"}
        lorakit.add_lora(model, lorakit.LoraConfig(r=2 + i % 3, alpha=8, target_modules=targets, **extra),
                         adapter=name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for layer in lora_layers(model):
                if name in layer.adapters:
                    for p in (layer.adapters[name].lora_A.weight, layer.adapters[name].lora_B.weight):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if task == "classification":
                head = [m for n, m in model.named_modules() if n.endswith(f"copies.{name}")][0]
                head.weight.normal_(0, 1.0, generator=g)
        paths[name] = lorakit.save_adapter(model, out, adapter=name)  # writes out/<name>
    return paths


def save_adapters(model_dir: Path, out: Path, names: list[str], task: str = "sft", labels=None) -> dict[str, Path]:
    """:func:`add_random_adapters` on a fresh copy of the model in ``model_dir``."""
    from lorakit.models import load_model

    model = load_model(str(model_dir), task, label_names=labels)
    model.config.name_or_path = str(model_dir)
    return add_random_adapters(model, out, names, task)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on 127.0.0.1 in a thread; yields the base URL; drains on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class Served(NamedTuple):
    """A server started by :func:`serving`: its base URL and its engine."""

    url: str
    engine: Any


@contextlib.contextmanager
def serving(model_dir: Path, adapters_dir: Path | None = None, app_options: dict | None = None, **options):
    """``model_dir`` with the adapters of ``adapters_dir`` served on 127.0.0.1 (``build_frontend`` with
    ``options``, then ``create_app`` with ``app_options``); yields a :class:`Served`."""
    from lorakit.serve.app import create_app
    from lorakit.serve.loading import build_frontend

    front = build_frontend(str(model_dir), adapters_dir=adapters_dir, **options)
    with running(create_app(front, **(app_options or {}))) as url:
        yield Served(url, front.engine)


def openai_client(url: str, api_key: str = "unused"):
    """The ``openai`` package's client for a server at ``url``: no retries, so a failure shows at once."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)
