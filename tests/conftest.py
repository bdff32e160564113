"""Tiny models shared by the tests: custom MLP/Conv/Embedding nets and random-init transformers models."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer

# the project's real datasets (SST-2, MRPC, RTE, CoLA, E2E, instructions) live beside the checkout
SHARED_DATA = Path(os.environ.get("LORAKIT_SHARED_DATA", Path(__file__).parents[1].parent / "shared" / "data"))


def shared_data(rel: str) -> Path:
    """A file of the shared datasets; the test is skipped where they are not present."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path

# fp32: the LoRA path adds one rank-r matmul pair; results differ from a reference only by float
# summation order, well under 1e-5 at these sizes. bf16 has an 8-bit mantissa (~4e-3 relative).
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, (3, 3), padding=1, stride=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # x: (b, 3, 10)
        h = torch.relu(self.conv1(x))  # (b, 8, 10)
        h = torch.relu(self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4)))  # (b, 6, 10, 4)
        return self.head(h.mean(dim=(2, 3)))


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, ids):
        return self.out(torch.tanh(self.proj(self.embed(ids))))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=101, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def token_llama(tied: bool = True):
    """The trainable-tokens model: vocab 40, hidden 16, one layer, embeddings tied to the head or not (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=101, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def save_random(path: Path, build: Callable, config, tokenizer, seed: int = 0) -> Path:
    """``build(config)`` (a model class, or ``AutoModel....from_config``) with seeded random weights, saved with
    ``tokenizer`` in ``path``: a model directory as the ``lorakit`` commands and the server load one."""
    torch.manual_seed(seed)
    build(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict]
    config: dict

    def run(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out


def _ids(b: int, vocab: int = 101, s: int = 7) -> torch.Tensor:
    return torch.randint(1, vocab, (b, s), generator=torch.Generator().manual_seed(b))


CASES = [
    Case("mlp", MLP, lambda b: {"x": torch.randn(b, 12, generator=torch.Generator().manual_seed(b))},
         {"target_modules": ["fc1", "fc2"], "bias": "lora_only"}),
    Case("conv", ConvNet, lambda b: {"x": torch.randn(b, 3, 10, generator=torch.Generator().manual_seed(b))},
         {"target_modules": ["conv1", "conv2", "head"]}),
    Case("embedding", EmbNet, lambda b: {"ids": _ids(b, 50)}, {"target_modules": ["embed", "proj"]}),
    Case("gpt2", gpt2, lambda b: {"input_ids": _ids(b)}, {"target_modules": ["c_attn", "c_proj"]}),
    Case("gpt2-slices", gpt2, lambda b: {"input_ids": _ids(b)},
         {"target_modules": ["c_attn"], "slices": {"c_attn": [True, False, True]}}),
    Case("llama", llama, lambda b: {"input_ids": _ids(b)}, {"target_modules": ["q_proj", "v_proj"]}),
    Case("bert", bert, lambda b: {"input_ids": _ids(b)},
         {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every adapter a non-zero B (and fresh A) so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.adapters.values():
                    for p in (adapter.lora_A.weight, adapter.lora_B.weight):
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def train_losses(model: nn.Module, steps: int, lr: float, **batch) -> list[float]:
    """``steps`` AdamW steps of ``model``'s trainable parameters on one ``batch``; the loss of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def build(case: Case, seed: int = 0, dtype=torch.float32, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build().to(dtype)
    return lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, **{**case.config, **overrides}))


@pytest.fixture
def one_thread():
    """One torch thread (as the subprocess runs use; no contention on a shared 2-core machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
