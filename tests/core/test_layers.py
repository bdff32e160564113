"""LoRA layers against a plain-torch reference: outputs, gradients, merge, dtypes."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer, LoraLinear
from tests.conftest import TOL, build, randomize_lora


def reference_linear(x, W, b, A, B, scaling):
    """h = x W^T + b + scaling * (x A^T) B^T  -- the paper's formula, written out."""
    return x @ W.T + (b if b is not None else 0) + scaling * (x @ A.T) @ B.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference_outputs_and_gradients(dtype):
    torch.manual_seed(0)
    base = nn.Linear(20, 12).to(dtype)
    model = nn.Sequential(base)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=6, target_modules=["0"]))
    randomize_lora(model)
    layer = model[0]
    adapter = layer.adapters["default"]
    x = torch.randn(5, 20, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    A = adapter.lora_A.weight.detach().clone().requires_grad_(True)
    B = adapter.lora_B.weight.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = reference_linear(x_ref, base.weight, base.bias, A, B, 6 / 4)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(adapter.lora_A.weight.grad, A.grad, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(adapter.lora_B.weight.grad, B.grad, atol=TOL[dtype], rtol=TOL[dtype])
    assert base.weight.grad is None  # frozen


@pytest.mark.parametrize("hooked", [False, True])
def test_inference_fast_path_equals_autograd_path_and_spares_hooked_outputs(hooked):
    """Under no_grad the update is added into the base output in place (one addmm); fp32, same kernels
    up to summation order: 1e-6. A forward hook that keeps the base output must see it unmodified."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["0"]))
    randomize_lora(model)
    kept = []
    if hooked:
        model[0].base_layer.register_forward_hook(lambda m, i, o: kept.append(o))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # grad enabled: the out-of-place path
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    if hooked:
        torch.testing.assert_close(kept[0], model[0].base_layer(x).detach(), atol=0, rtol=0)


def test_rslora_scaling():
    config = lorakit.LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["0"])
    assert config.scaling("0") == pytest.approx(8 / 4)
    assert lorakit.LoraConfig(r=16, alpha=8, target_modules=["0"]).scaling("0") == pytest.approx(0.5)


def test_gpt2_conv1d_matches_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 20))  # weight (in=20, out=12): fan_in_fan_out
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, target_modules=["0"]))
    randomize_lora(model)
    layer = model[0]
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    a = layer.adapters["default"]
    x = torch.randn(2, 4, 20)
    ref = reference_linear(x, layer.base_layer.weight.T, layer.base_layer.bias, a.lora_A.weight, a.lora_B.weight, 1.0)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    assert layer.delta_weight("default").shape == layer.base_layer.weight.shape == (20, 12)


def test_dropout_acts_on_lora_input_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, dropout=0.5, target_modules=["0"]))
    randomize_lora(model)
    layer = model[0]
    x = torch.randn(64, 16)
    with lorakit.disabled(model):
        base_out = layer(x)
    model.train()
    torch.manual_seed(1)
    train_out = layer(x)
    torch.manual_seed(1)
    a = layer.adapters["default"]
    expected = base_out + a.lora_B(a.lora_A(torch.nn.functional.dropout(x, 0.5, True))) * a.scaling
    torch.testing.assert_close(train_out, expected, atol=1e-5, rtol=1e-5)


def test_zero_b_and_kaiming_a_at_init(case):
    model = build(case)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.lora_B.weight) == 0
        assert torch.count_nonzero(a.lora_A.weight) > 0


def test_gaussian_init_std():
    model = nn.Sequential(nn.Linear(4096, 8))
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, init="gaussian", target_modules=["0"]))
    std = model[0].adapters["default"].lora_A.weight.std().item()
    assert std == pytest.approx(1 / 8, rel=0.05)
