"""Trainable-token adapters in per-row batches (``per_row_adapters`` and the resident ``AdapterPool``), tied and
untied, beside LoRA adapters, an adapter holding both, and base rows: each row equals the same row run alone with
its adapter (``use_adapter``) or with none (``disabled``).

Adapters on a tiny random LLaMA (vocab 40): ``emb`` rows of the embedding (tied: the head follows), ``both`` rows
of the embedding and of the untied head (tied models: the embedding alone, the head follows), ``mix`` LoRA on
q_proj plus rows of its own ids, ``lora`` LoRA on q_proj and v_proj. Tolerance fp32 1e-5: a row in a batch and the
same row alone differ in summation order only; a row given another adapter's rows differs by ~1.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.ops.pool import AdapterPool
from lorakit.variants.tokens import TokenLayer

transformers = pytest.importorskip("transformers")
FP32 = {"atol": 1e-5, "rtol": 1e-5}
ROWS = ["emb", "lora", None, "both", "mix", "emb", "both"]


def model_with_adapters(tied: bool):
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    both = [30, 31, 5] if tied else {"embed_tokens": [30, 31, 5], "lm_head": [30, 31, 5]}
    configs = {
        "emb": lorakit.LoraConfig(target_modules=[], trainable_token_indices=[3, 5, 17]),
        "both": lorakit.LoraConfig(target_modules=[], trainable_token_indices=both),
        "mix": lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 8]),
        "lora": lorakit.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]),
    }
    g = torch.Generator().manual_seed(1)
    for name, config in configs.items():
        lorakit.add_lora(model, config, adapter=name)
        with torch.no_grad():
            for m in model.modules():
                if name in getattr(m, "adapters", {}):
                    for p in m.adapters[name].parameters():
                        p.copy_(torch.randn(p.shape, generator=g))
    return model


def tokens():
    x = torch.randint(0, 40, (len(ROWS), 8), generator=torch.Generator().manual_seed(2))
    x[:, :4] = torch.tensor([3, 5, 30, 8])  # every adapter's ids occur in every row
    return x


def alone(model, x):
    """Each row run by itself, with its adapter active (or disabled for a base row)."""
    out = []
    for i, name in enumerate(ROWS):
        with lorakit.disabled(model) if name is None else lorakit.use_adapter(model, name):
            out.append(model(x[i:i + 1]).logits)
    return torch.cat(out)


@pytest.mark.parametrize("tied", [True, False])
def test_token_rows_per_row_and_pooled_equal_each_row_alone(tied):
    model, x = model_with_adapters(tied), tokens()
    assert isinstance(model.lm_head, TokenLayer)  # tied: it follows the embedding; untied: "both" has head rows
    with torch.no_grad():
        want = alone(model, x)
        with lorakit.per_row_adapters(model, ROWS):
            got = model(x).logits
        pool = AdapterPool(model, slots=2)  # 4 adapters in 2 slots: the pool grows on the way
        for name in ["emb", "both", "mix", "lora"]:
            pool.add(name)
        with pool.rows(ROWS):
            pooled = model(x).logits
        with pool.rows(["both"] * len(ROWS)):  # one adapter for every row
            shared = model(x).logits
        with lorakit.use_adapter(model, "both"):
            both = model(x).logits
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(pooled, want, **FP32)
    torch.testing.assert_close(shared, both, **FP32)
    assert (want[0] - want[3]).abs().max() > 0.5  # rows of different adapters really differ
    assert all(m.row_plan is None for m in model.modules() if hasattr(m, "row_plan"))  # contexts restored


def test_token_rows_per_row_gradients_equal_each_row_alone():
    """Training with per-row adapters: each adapter's rows get the gradient of its own rows' loss."""
    x = tokens()
    model = model_with_adapters(False).train()
    for m in model.modules():  # every adapter trains (add_lora leaves the last one's parameters trainable)
        if isinstance(getattr(m, "adapters", None), torch.nn.ModuleDict):
            m.adapters.requires_grad_(True)
    with lorakit.per_row_adapters(model, ROWS):
        model(x, labels=x).logits.float().logsumexp(-1).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(ROWS):
        if name is not None:
            with lorakit.use_adapter(model, name):
                model(x[i:i + 1]).logits.float().logsumexp(-1).sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("trainable_tokens_delta" in n for n in got) and got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4, msg=n)
