"""Tests for lorakit.ops.per_row: the gathered fast path against the references.

Two oracles: ``loop_update`` (each adapter on its own rows, one layer) and the whole model run one row at
a time under ``use_adapter`` (``None`` rows: the base model). Outputs and gradients (input, every adapter's
A and B) must agree.

Tolerances. fp32: 1e-5. Both sides compute the same products in fp32 but in a different order (batched
matmuls over zero-padded ranks, the scaling folded into B before the product rather than after), so
they differ by rounding only, ~1e-7 relative at these sizes; a wrong slot, a missed scaling or a
dropped row gives differences of order 1. bf16: 3e-2 of the tensor's largest value, a few ulps of
bf16's 2**-8 relative step (folding the scaling into B adds one bf16 rounding the reference does not
have, and gradients of A and B sum many rounded terms).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.core.model import lora_layers
from lorakit.ops.per_row import LoopUpdate, RowPlan, StackedWeights, loop_update, make_row_update

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

NAMES = ["a", None, "b", "a", "b"]  # five rows: two adapters, one base row
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class Net(nn.Module):
    """One adaptable layer ``proj`` followed by a fixed nonlinearity (so gradients depend on the output)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return torch.tanh(self.proj(x))


def make_case(kind: str, dtype=torch.float32):
    """(model with adapters "a" and "b", input batch of len(NAMES) rows, LoraConfig of "b")."""
    torch.manual_seed(0)
    b = len(NAMES)
    cfg_b = None
    if kind == "linear":
        proj, x = nn.Linear(16, 12), torch.randn(b, 7, 16)
    elif kind == "linear_2d":  # rows without a sequence dimension
        proj, x = nn.Linear(16, 12), torch.randn(b, 16)
    elif kind == "mixed_rank":
        proj, x = nn.Linear(16, 12), torch.randn(b, 7, 16)
        cfg_b = lorakit.LoraConfig(r=6, alpha=3.0, target_modules=["proj"])
    elif kind in ("conv1d", "conv1d_sliced"):  # GPT-2's Conv1D (weight stored (in, out)), e.g. c_attn
        proj, x = Conv1D(24, 16), torch.randn(b, 7, 16)
    elif kind == "embedding":
        proj, x = nn.Embedding(50, 12), torch.randint(0, 50, (b, 7))
    elif kind == "conv2d":
        proj, x = nn.Conv2d(3, 6, 3, padding=1), torch.randn(b, 3, 8, 8)
    else:
        raise ValueError(kind)
    slices = {"proj": [True, False, True]} if kind == "conv1d_sliced" else {}
    cfg_a = lorakit.LoraConfig(r=4, alpha=8.0, target_modules=["proj"], slices=slices)
    cfg_b = cfg_b or lorakit.LoraConfig(r=4, alpha=4.0, target_modules=["proj"], slices=slices)
    model = Net(proj)
    lorakit.add_lora(model, cfg_a, adapter="a")
    lorakit.add_lora(model, cfg_b, adapter="b")
    with torch.no_grad():  # B starts at zero: make every update (and every A gradient) non-zero
        for layer in lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.weight.normal_(0, 0.5)
    model.requires_grad_(True)  # gradients for both adapters and the base
    model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, x


KINDS = ["linear", "linear_2d", "mixed_rank", "conv1d", "conv1d_sliced", "embedding", "conv2d"]


def layer_of(model) -> LoraLayer:
    return next(lora_layers(model))


def assert_close(actual, expected, dtype, what=""):
    """fp32: elementwise. bf16: relative to the tensor's largest value (a gradient element that is a sum of
    cancelling bf16 terms has no meaningful elementwise relative error)."""
    tol = TOL[dtype]
    actual, expected = actual.float(), expected.float()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    else:
        err = float((actual - expected).abs().max()) / max(float(expected.abs().max()), 1e-6)
        assert err <= tol, f"{what}: max difference {err:.3g} of the largest value, more than {tol}"


# ----- one layer: gathered vs loop reference ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [False, True])
def test_row_update_matches_loop_reference(kind, grad):
    model, x = make_case(kind)
    layer = layer_of(model)
    update = make_row_update(layer, NAMES)
    assert isinstance(update, LoopUpdate if kind == "conv2d" else RowPlan)
    with torch.set_grad_enabled(grad):
        got, want = update(x), loop_update(layer, x, NAMES)
        assert_close(got, want, torch.float32, kind)
        if not grad:  # the cached per-row weights give the same answer on the next call
            assert_close(update(x), want, torch.float32, f"{kind} cached")


@pytest.mark.parametrize("kind", ["linear", "conv1d_sliced", "embedding"])
def test_shared_and_base_only_rows(kind):
    """All rows on one adapter (no gather), and every row a base row (update zero)."""
    model, x = make_case(kind)
    layer = layer_of(model)
    shared = ["b"] * len(NAMES)
    update = make_row_update(layer, shared)
    assert isinstance(update, RowPlan) and isinstance(update.weights, StackedWeights) and update.shared
    assert_close(update(x), loop_update(layer, x, shared), torch.float32, kind)
    base_only = [None] * len(NAMES)
    assert float(loop_update(layer, x, base_only).abs().max()) == 0.0
    assert float(make_row_update(layer, base_only)(x).abs().max()) == 0.0


# ----- whole model: per-row vs each row alone -------------------------------------------------------------
def reference_rows(model, x, names, weight):
    """Each row run alone with its adapter active; returns (outputs, loss summed over rows)."""
    outs = []
    for i, name in enumerate(names):
        with lorakit.use_adapter(model, name):
            outs.append(model(x[i : i + 1]))
    out = torch.cat(outs)
    return out, (out.float() * weight).sum()


def grads(model, x):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if "adapters" in n}
    if x.is_floating_point():
        g["input"] = x.grad.clone()
    return g


def zero_grads(model, x):
    model.zero_grad(set_to_none=True)
    x.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_per_row_matches_rows_alone_outputs_and_grads(kind, dtype):
    model, x = make_case(kind, dtype)
    if x.is_floating_point():
        x.requires_grad_(True)
    weight = torch.randn_like(model(x).float())  # a loss that weighs every output element differently

    want, loss = reference_rows(model, x, NAMES, weight)
    loss.backward()
    want_grads = grads(model, x)
    zero_grads(model, x)

    with lorakit.per_row_adapters(model, NAMES):
        got = model(x)
    (got.float() * weight).sum().backward()
    got_grads = grads(model, x)

    assert_close(got, want, dtype, f"{kind} output")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], dtype, f"{kind} grad {name}")
    # the base row's gradient reaches no adapter: B of "a" and "b" got gradients from their own rows only
    assert any(float(g.abs().max()) > 0 for n, g in got_grads.items() if "adapters.a." in n)
    assert any(float(g.abs().max()) > 0 for n, g in got_grads.items() if "adapters.b." in n)


@pytest.mark.parametrize("kind", ["linear", "conv1d_sliced", "embedding"])
def test_per_row_no_grad_reuses_weights_across_calls(kind):
    """Decoding calls the layers many times inside one context: cached per-row weights, same outputs."""
    model, x = make_case(kind)
    want, _ = reference_rows(model, x, NAMES, 1.0)
    with torch.inference_mode(), lorakit.per_row_adapters(model, NAMES):
        first, second = model(x), model(x)
        plan = layer_of(model).row_plan
        assert plan.weights.cached is not None
    assert_close(first, want.detach(), torch.float32, kind)
    assert torch.equal(first, second)
    assert layer_of(model).row_plan is None  # the context restored the layer


def test_per_row_weights_follow_training_under_grad():
    """With grad enabled nothing is cached: an optimizer step inside the context is seen by the next call."""
    model, x = make_case("linear")
    with lorakit.per_row_adapters(model, NAMES):
        before = model(x)
        with torch.no_grad():
            layer_of(model).adapters["a"].lora_B.weight.add_(1.0)
        after = model(x)
    changed = (after - before).abs().flatten(1).amax(1) > 1e-3
    assert changed.tolist() == [n == "a" for n in NAMES]


def test_per_row_grad_call_after_a_no_grad_call_reaches_every_adapter():
    """Weights cached by a no_grad call are not reused with grad enabled: the loss reaches each adapter."""
    model, x = make_case("linear")
    with lorakit.per_row_adapters(model, NAMES):
        with torch.no_grad():
            model(x)
        model(x).square().sum().backward()
    for name in ("a", "b"):
        assert float(layer_of(model).adapters[name].lora_A.weight.grad.abs().max()) > 0, name


def test_wrong_number_of_rows_is_refused():
    model, x = make_case("linear")
    with lorakit.per_row_adapters(model, NAMES[:-1]), pytest.raises(ValueError, match="adapter names for a batch"):
        model(x)
