"""A multi-task classification setup: a base BERT saved with a 2-class head and three adapters trained (here:
drawn) with heads of 3 classes, 2 classes and one output (regression)."""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model
from tests.serve.helpers import save_bert

HEADS = {"nli": ["entailment", "neutral", "contradiction"], "sst": ["negative", "positive"], "stsb": None}


def save_heads(root: Path) -> tuple[Path, Path]:
    """``(base model dir, adapters dir)`` under ``root``; adapter ``name`` has the classes ``HEADS[name]``
    (None: a regression head)."""
    base = save_bert(root / "bert", num_labels=2)
    adapters = root / "adapters"
    for k, (name, labels) in enumerate(HEADS.items()):
        model = load_model(str(base), "classification", num_labels=1 if labels is None else len(labels),
                           label_names=labels)
        model.config.name_or_path = str(base)
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                   modules_to_save=["classifier"]), adapter=name)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        lorakit.save_adapter(model, adapters, adapter=name)
    return base, adapters
