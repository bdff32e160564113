"""Tiny random-init models and data for the Trainer / SFTTrainer tests (no network, a few steps each)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

import lorakit

VOCAB = 512  # a large-ish table so a full-model save is clearly bigger than the adapter
LORA = {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}


def bert_base(seed: int = 0):
    """BertForSequenceClassification, 2 layers of width 32, 3 classes, no dropout: runs are deterministic."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def bert_lora(seed: int = 0, **overrides):
    """The same base every time (seed 0), adapter init under ``seed``."""
    model = bert_base(0)
    torch.manual_seed(seed)
    return lorakit.add_lora(model, lorakit.LoraConfig(**{**LORA, **overrides}))


def records(n: int = 16, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (8,), generator=g), "labels": i % 3} for i in range(n)]


def probe() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(7))


def args(out: Path, **kw):
    from transformers import TrainingArguments

    base = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
            "report_to": [], "use_cpu": True, "logging_steps": 100, "disable_tqdm": True, "seed": 0}
    return TrainingArguments(str(out), **{**base, **kw})


def adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "adapter_model.safetensors")


def files(path: Path) -> dict[str, int]:
    """name -> size in bytes of every file under ``path``."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def full_model_bytes(model: torch.nn.Module) -> int:
    """The least a full-model save must write: every base parameter in its dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
