"""DoRA rows in mixed batches: per_row_adapters and the resident pool against PEFT's DoRA, row by row.

Each row of a batch that mixes two DoRA adapters (different ranks and alphas), a plain LoRA adapter and base
rows must equal PEFT's output for that row's adapter alone (PEFT loads lorakit's checkpoint of it on an
untouched copy of the base), on an embedding, a linear layer with a bias and one without.

Tolerance: fp32, 1e-5 absolute and relative. Both sides compute the same products in fp32 in a different
order (batched matmuls over zero-padded ranks, the scaling folded into B, the DoRA norm from factored terms
rather than from the materialised ``W0 + s·B·A``), ~1e-7 relative at these sizes; a wrong factor, slot or
bias handling gives differences of order 0.1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops.pool import AdapterPool
from lorakit.variants.dora import DoraAdapter
from tests.conftest import randomize_lora

peft = pytest.importorskip("peft")

NAMES = ["d1", "plain", None, "d2", "d1", "plain"]
ADAPTERS = {"d1": {"r": 4, "alpha": 8.0, "use_dora": True}, "d2": {"r": 2, "alpha": 3.0, "use_dora": True},
            "plain": {"r": 4, "alpha": 8.0}}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 24)  # with a bias: DoRA scales W0·x, not the bias
        self.fc2 = nn.Linear(24, 12, bias=False)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


def _model():
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    for name, kw in ADAPTERS.items():
        lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["emb", "fc1", "fc2"], **kw), adapter=name)
    randomize_lora(model, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # magnitudes away from the norms: every factor m/n differs from 1
        for m in model.modules():
            if isinstance(m, DoraAdapter):
                m.lora_magnitude_vector.mul_(0.5 + torch.rand(m.lora_magnitude_vector.shape, generator=g))
    return base, model.eval()


def _peft_rows(base, model, ids, tmp_path):
    """Row i as PEFT computes it with adapter NAMES[i] alone (the base model for None)."""
    want = {None: base(ids)}
    for name in ADAPTERS:
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name / name).eval()
        want[name] = loaded(ids)
    return torch.stack([want[n][i] for i, n in enumerate(NAMES)])


@torch.no_grad()
def test_dora_rows_mixed_with_plain_and_base_rows_equal_peft(tmp_path):
    base, model = _model()
    ids = torch.randint(0, 50, (len(NAMES), 5), generator=torch.Generator().manual_seed(3))
    want = _peft_rows(base, model, ids, tmp_path)
    with lorakit.per_row_adapters(model, NAMES):
        per_row = model(ids)
    torch.testing.assert_close(per_row, want, atol=1e-5, rtol=1e-5)
    pool = AdapterPool(model, slots=2)  # grows once on the third adapter
    for name in ADAPTERS:
        pool.add(name)
    with pool.rows(NAMES):
        pooled, again = model(ids), model(ids)  # the second call reads the gathered operands
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(pooled, again)
    for name in ("d1", None):  # every row one DoRA adapter (shared: no gather), and no DoRA row at all
        with pool.rows([name] * len(NAMES)):
            shared = model(ids)
        with lorakit.use_adapter(model, name):
            torch.testing.assert_close(shared, model(ids), atol=1e-5, rtol=1e-5)
    pool.remove("d1")  # a freed slot's factors go back to 1 for the next adapter
    pool.add("d1")
    with pool.rows(NAMES):
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)


def test_dora_rows_train_under_per_row_like_each_adapter_alone():
    """With grad enabled the factors are recomputed per call: the gradient of a DoRA magnitude is the one its
    rows give with the adapter alone."""
    _, model = _model()
    ids = torch.randint(0, 50, (len(NAMES), 5), generator=torch.Generator().manual_seed(4))
    magnitude = model.fc1.adapters["d2"].lora_magnitude_vector.requires_grad_(True)  # "plain" trains (added last)
    with lorakit.per_row_adapters(model, NAMES):
        model(ids).square().sum().backward()
    got, magnitude.grad = magnitude.grad.clone(), None
    rows = [i for i, n in enumerate(NAMES) if n == "d2"]
    with lorakit.use_adapter(model, "d2"):
        model(ids[rows]).square().sum().backward()
    assert float(got.abs().max()) > 0
    torch.testing.assert_close(got, magnitude.grad, atol=1e-5, rtol=1e-5)
