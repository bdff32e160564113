"""Many adapters on one model: whole-model queries must not walk every adapter's insides.

A server keeps hundreds of adapters in one model. ``model.modules()`` visits each adapter's submodules, and
adding an adapter made about fifteen such walks, so adding the n-th adapter cost O(n) walks of O(n) modules
(1,000 adapters on a 4-layer LLaMA: about 25 minutes of set-up by the measured curve, docs/serving.md). The walks now stop at the per-adapter
containers; these tests count the visits instead of timing them.
"""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.core.model import wrappers
from lorakit.core.saved import SavedModule
from lorakit.core.targets import outside_adapters
from tests.conftest import MLP


def _model(n: int) -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    for i in range(n):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
                         adapter=f"a{i}")
    return model


def _inside_adapters(model: nn.Module) -> set[int]:
    """ids of every module inside an adapter or a modules_to_save copy."""
    held = [m.adapters for m in model.modules() if isinstance(m, LoraLayer)]
    held += [m.copies for m in model.modules() if isinstance(m, SavedModule)]
    return {id(sub) for container in held for sub in container.modules()}


@pytest.fixture
def walks_inside(monkeypatch):
    """(ids to watch, calls): records each ``named_modules`` call (what ``modules()`` and ``parameters()``
    recurse through) on a module whose id the test puts in the watched set."""
    watched: set[int] = set()
    calls = []
    original = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        if id(self) in watched:
            calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return watched, calls


def test_adding_switching_and_deleting_never_walk_the_other_adapters(walks_inside):
    watched, calls = walks_inside
    model = _model(6)
    watched |= _inside_adapters(model)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
                     adapter="new")
    lorakit.set_adapter(model, "a3")
    lorakit.delete_adapter(model, "a5")
    assert calls == []  # before the fix: hundreds (each of ~15 walks entered all 6 adapters x 3 layers)
    # ... and each still did its job: exactly a3's A and B (2 layers) and its head copy (weight, bias) train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.adapters.a3.lora_A.weight", "fc1.adapters.a3.lora_B.weight",
                         "fc2.adapters.a3.lora_A.weight", "fc2.adapters.a3.lora_B.weight",
                         "head.copies.a3.weight", "head.copies.a3.bias"}
    assert lorakit.adapter_names(model) == [f"a{i}" for i in range(5)] + ["new"]


def test_set_adapter_freezes_a_parameter_of_another_adapter_set_by_hand():
    model = _model(3)
    model.fc1.adapters["a0"].lora_B.weight.requires_grad_(True)  # the user's doing; set_adapter undoes it
    model.head.copies["a1"].bias.requires_grad_(True)
    lorakit.set_adapter(model, "a2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.adapters.a2.lora_A.weight", "fc1.adapters.a2.lora_B.weight",
                         "fc2.adapters.a2.lora_A.weight", "fc2.adapters.a2.lora_B.weight",
                         "head.copies.a2.weight", "head.copies.a2.bias"}


def test_outside_adapters_is_named_modules_less_the_adapters_insides():
    model = _model(3)
    inside = _inside_adapters(model)
    expected = [(p, m) for p, m in model.named_modules() if id(m) not in inside]
    assert [(p, id(m)) for p, m in outside_adapters(model)] == [(p, id(m)) for p, m in expected]
    layers, saved = wrappers(model)
    assert layers == [model.fc1, model.fc2] and saved == [model.head]


def test_modules_to_save_over_another_adapters_lora_layer_is_refused():
    """Its copies would hold copies of the LoRA layer, which whole-model queries no longer enter."""
    model = MLP()
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["head"]), adapter="a")
    with pytest.raises(ValueError, match=r"modules_to_save 'head' contains 'head', which adapter\(s\) \['a'\] adapt"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]), adapter="b")
    assert lorakit.adapter_names(model) == ["a"] and isinstance(model.head, LoraLayer)  # untouched
