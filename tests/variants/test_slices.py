"""Fused slices (lorakit.variants.slices): only the enabled output slices adapted, exported as plain LoRA."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.variants.slices import SlicedAdapter
from tests.conftest import randomize_lora


def test_fused_slices_adapt_only_enabled_slices_and_equal_plain_export():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(3 * 8, 8))  # fused q, k, v of width 8
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["0"], slices={"0": [True, False, True]}))
    randomize_lora(model)
    layer = model[0]
    adapter = layer.adapters["default"]
    assert isinstance(adapter, SlicedAdapter)
    assert adapter.lora_A.weight.shape == (4, 8) and adapter.lora_B.weight.shape == (16, 2)
    x = torch.randn(3, 5, 8)
    update = layer(x) - layer.base_layer(x)
    assert torch.equal(update[..., 8:16], torch.zeros_like(update[..., 8:16]))  # k untouched, exactly
    assert update[..., :8].abs().min() > 0 and update[..., 16:].abs().min() > 0
    A, B = adapter.plain_pair()  # plain LoRA of rank 4 with block-structured B
    assert A.shape == (4, 8) and B.shape == (24, 4)
    torch.testing.assert_close(update, (x @ A.T @ B.T) * adapter.scaling, atol=1e-5, rtol=1e-5)


def test_sliced_parameter_count_matches_loralib():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(3 * 64, 64))
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["0"], slices={"0": [True, False, True]}))
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == 2 * (4 * 64 + 64 * 4)  # q and v each: A (r x k) + B (d x r)


def test_slices_must_split_evenly():
    model = nn.Sequential(nn.Linear(8, 10))
    with pytest.raises(ValueError, match="does not split into 3 equal parts"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["0"], slices={"0": [True, False, True]}))


def test_slices_for_a_module_that_is_not_adapted_are_refused():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"slices \['2'\] match no adapted module; targets: \['0', '1'\]"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"], slices={"2": [True, False, True]}))
    assert type(model[0]) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
