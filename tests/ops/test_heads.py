"""Adapters whose classification heads differ in shape (2 classes, 3 classes, a regression head) on one base:
each loads with its own head, and per-row batches give each row its own head's outputs."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.model import delete_adapter, set_adapter
from lorakit.ops.per_row import per_row_adapters

transformers = pytest.importorskip("transformers")


def _bert(num_labels: int):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                  vocab_size=50, max_position_embeddings=16, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def _saved(tmp_path, classes: int, name: str):
    """An adapter trained (here: drawn) on a base with a ``classes``-way head, saved."""
    model = _bert(classes)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                               task_type="SEQ_CLS"), adapter=name)
    g = torch.Generator().manual_seed(classes)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    ids = torch.randint(3, 50, (4, 7), generator=g)
    return lorakit.save_adapter(model, tmp_path, adapter=name), model(input_ids=ids).logits, ids


def test_heads_of_three_shapes_share_a_base_and_a_batch(tmp_path):
    saved = {f"h{c}": _saved(tmp_path, c, f"h{c}") for c in (2, 3, 1)}
    base = _bert(2)
    for name, (path, _, _) in saved.items():
        lorakit.load_adapter(base, path, adapter=name)
    ids = torch.cat([saved[n][2] for n in saved])  # 4 rows per adapter, one batch
    names = [n for n in saved for _ in range(4)]
    with torch.no_grad(), per_row_adapters(base, names):
        mixed = base(input_ids=ids).logits  # (12, 3): zero-padded to the widest head
    assert mixed.shape == (12, 3)
    for k, (name, (_, want, _)) in enumerate(saved.items()):
        rows = mixed[4 * k:4 * k + 4]
        width = want.shape[1]
        # same weights, same inputs, float32: only the order of reductions differs from the saved model's own run
        torch.testing.assert_close(rows[:, :width], want, atol=1e-5, rtol=1e-5)
        assert (rows[:, width:] == 0).all()
        set_adapter(base, name)
        with torch.no_grad():
            torch.testing.assert_close(base(input_ids=saved[name][2]).logits, want, atol=1e-5, rtol=1e-5)
    delete_adapter(base, "h3")
    assert base.classifier.original.out_features == 2  # the base's own head is untouched
