"""PEFT's LoRA test scenarios (test_custom_models / testing_common style) on lorakit's API.

A matrix of tiny custom models x configs, each run through the scenarios PEFT's suite runs for LoRA:
output finite and changed, only adapter parameters train, save/load, merge / safe merge / unmerge,
unload (both ways), disable, several adapters (switch, delete), dtypes, mixed batches; and, where PEFT
(0.21.2, the `bench` extra) is installed, the same adapter in both libraries gives the same outputs and
gradients. Written from the scenarios' descriptions, not PEFT's code.

Tolerances: fp32 results that differ only by summation order (merged vs unmerged, lorakit vs PEFT) agree to
1e-5 at these sizes; bf16 (8-bit mantissa) to 3e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.core.saved import SavedModule
from tests.conftest import token_llama
from tests.variants.moe_models import ARCHS as MOE_ARCHS
from tests.variants.moe_models import EXPERTS, tiny_moe, token_ids

FP32 = {"atol": 1e-5, "rtol": 1e-5}
# the bias case disables an adapter that trains biases: both libraries warn, as they should
pytestmark = [pytest.mark.filterwarnings("ignore:.*trained the base biases"),
              pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias")]


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 10)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.emb(x).mean(1))


class ConvModel(nn.Module):
    def __init__(self, conv: type):
        super().__init__()
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv]
        self.dims = dims
        self.conv = conv(3, 5, 3, padding=1)
        self.lin0 = nn.Linear(5, 2)

    def forward(self, x):
        return self.lin0(self.conv(x).mean(dim=tuple(range(2, 2 + self.dims))))


MODELS = {
    "mlp": (MLP, lambda g, b: torch.randn(b, 10, generator=g)),
    "mlp-nobias": (lambda: MLP(bias=False), lambda g, b: torch.randn(b, 10, generator=g)),
    "emb": (EmbModel, lambda g, b: torch.randint(0, 30, (b, 5), generator=g)),
    "conv1d": (lambda: ConvModel(nn.Conv1d), lambda g, b: torch.randn(b, 3, 8, generator=g)),
    "conv2d": (lambda: ConvModel(nn.Conv2d), lambda g, b: torch.randn(b, 3, 6, 6, generator=g)),
    "conv3d": (lambda: ConvModel(nn.Conv3d), lambda g, b: torch.randn(b, 3, 4, 4, 4, generator=g)),
}

# (name, model, LoraConfig kwargs): PEFT's "Vanilla MLP 1..n", "Embedding", "Conv1d/2d/3d" cases
CASES = [
    ("mlp-lin0", "mlp", {"target_modules": ["lin0"]}),
    ("mlp-both", "mlp", {"target_modules": r"lin\d"}),
    ("mlp-dropout", "mlp", {"target_modules": ["lin0", "lin1"], "dropout": 0.1}),
    ("mlp-save", "mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("mlp-rslora", "mlp", {"target_modules": ["lin0"], "use_rslora": True, "alpha": 12}),
    ("mlp-patterns", "mlp", {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 2},
                             "alpha_pattern": {"lin0": 3.0}}),
    ("mlp-bias", "mlp", {"target_modules": ["lin0"], "bias": "lora_only"}),
    ("mlp-nobias", "mlp-nobias", {"target_modules": ["lin0", "lin1"]}),
    ("conv1d-lin", "conv1d", {"target_modules": ["conv", "lin0"]}),
    ("emb", "emb", {"target_modules": ["emb"]}),
    ("emb-lin", "emb", {"target_modules": ["emb", "lin0"]}),
    ("conv2d", "conv2d", {"target_modules": ["conv"]}),
    ("conv3d", "conv3d", {"target_modules": ["conv"]}),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


def _base(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name][0]().eval()


def _inputs(model_name: str, batch: int = 4, seed: int = 1):
    return MODELS[model_name][1](torch.Generator().manual_seed(seed), batch)


def _adapted(case, adapter="default", seed=2) -> nn.Module:
    """The base model with a LoRA whose B is non-zero (PEFT's ``init_lora_weights=False``)."""
    _, model_name, kwargs = case
    model = lorakit.add_lora(_base(model_name), lorakit.LoraConfig(r=4, **kwargs), adapter)
    _randomize(model, adapter, seed)
    return model


def _randomize(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer) and adapter in m.adapters:
                for p in m.adapters[adapter].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if isinstance(m, SavedModule) and adapter in m.copies:
                for p in m.copies[adapter].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----- single adapter ------------------------------------------------------------------------------------------
def test_forward_output_finite_and_changed(case):
    x = _inputs(case[1])
    base_out = _base(case[1])(x)
    out = _adapted(case)(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, base_out)


def test_only_adapter_parameters_are_updated(case):
    model = _adapted(case).train()
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(_inputs(case[1])).pow(2).sum().backward()
    optimizer.step()
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in base_before.items())
    changed = {n for n, p in trained.items() if not torch.equal(now[n], p)}
    expected = {n for n in trained if ".adapters.default." in n or ".copies.default." in n or n.endswith("bias")}
    assert changed == expected and changed


def test_save_and_load_round_trip(case, tmp_path):
    model = _adapted(case)
    x = _inputs(case[1])
    lorakit.save_adapter(model, tmp_path)
    fresh = _base(case[1])
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), model(x), **FP32)
    assert not any(m.training for m in fresh.modules())  # the fresh model was in eval mode


@pytest.mark.parametrize("safe", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(case, safe):
    model = _adapted(case)
    x = _inputs(case[1])
    before, weights = model(x), _weights(model)
    lorakit.merge(model, safe=safe)
    torch.testing.assert_close(model(x), before, **FP32)
    lorakit.unmerge(model)
    for k, v in _weights(model).items():  # fp32: the subtraction restores W0 to rounding
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=1e-6)


def test_unload_with_and_without_merge(case):
    x = _inputs(case[1])
    model = _adapted(case)
    adapted = model(x)
    plain = lorakit.unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, LoraLayer | SavedModule) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in _base(case[1]).modules()]
    torch.testing.assert_close(plain(x), adapted, **FP32)
    base = lorakit.unload(model, merge=False)
    assert torch.equal(base(x), _base(case[1])(x))


def test_disabled_equals_base(case):
    model = _adapted(case)
    x = _inputs(case[1])
    adapted = model(x)
    with lorakit.disabled(model):
        assert torch.equal(model(x), _base(case[1])(x))
    assert torch.equal(model(x), adapted)


def test_low_precision_forward_and_merge(case):
    dtype = torch.bfloat16
    model = _adapted(case).to(dtype)
    x = _inputs(case[1])
    x = x.to(dtype) if x.is_floating_point() else x
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    lorakit.merge(model)
    torch.testing.assert_close(model(x).float(), out.float(), atol=3e-2, rtol=3e-2)


# ----- several adapters ----------------------------------------------------------------------------------------
def _two(case):
    if case[2].get("bias", "none") != "none":
        pytest.skip("only one adapter may train the base biases (as in PEFT)")
    model = _adapted(case, "a", seed=2)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, **case[2]), "b")
    _randomize(model, "b", seed=3)
    return model


def test_active_adapter_switch_and_delete(case):
    model = _two(case)
    x = _inputs(case[1])
    assert lorakit.active_adapter(model) == "b"
    out_b = model(x)
    lorakit.set_adapter(model, "a")
    out_a = model(x)
    assert not torch.allclose(out_a, out_b)
    torch.testing.assert_close(out_a, _adapted(case, "a", seed=2)(x), **FP32)
    lorakit.delete_adapter(model, "b")  # inactive
    assert lorakit.adapter_names(model) == ["a"] and torch.equal(model(x), out_a)
    lorakit.delete_adapter(model, "a")
    assert torch.equal(model(x), _base(case[1])(x))


def test_mixed_adapter_batches(case):
    model = _two(case)
    x = _inputs(case[1], batch=5)
    names = ["a", None, "b", "a", "b"]
    with lorakit.per_row_adapters(model, names):
        out = model(x)
    for i, name in enumerate(names):
        with lorakit.use_adapter(model, name):
            torch.testing.assert_close(out[i:i + 1], model(x[i:i + 1]), **FP32)


def test_merging_one_of_two_adapters(case):
    model = _two(case)
    x = _inputs(case[1])
    lorakit.set_adapter(model, "a")
    expected = model(x)
    lorakit.merge(model, "a")
    torch.testing.assert_close(model(x), expected, **FP32)
    with pytest.raises(RuntimeError, match="merged"):
        lorakit.set_adapter(model, "b")


# ----- against PEFT itself --------------------------------------------------------------------------------------
_FROM_LORAKIT = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _peft_model(case):
    peft = pytest.importorskip("peft")
    _, model_name, kwargs = case
    cfg = peft.LoraConfig(r=4, init_lora_weights=False, **{_FROM_LORAKIT.get(k, k): v for k, v in kwargs.items()})
    torch.manual_seed(5)  # PEFT's own random A and B
    return peft.get_peft_model(_base(model_name), cfg).eval()


def test_peft_adapter_gives_the_same_outputs_and_gradients(case, tmp_path):
    peft_model = _peft_model(case)
    _, model_name, _ = case
    x = _inputs(model_name)
    peft_model.save_pretrained(tmp_path)
    model = _base(model_name)
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(x), peft_model(x), **FP32)
    with peft_model.disable_adapter(), lorakit.disabled(model):
        torch.testing.assert_close(model(x), peft_model(x), **FP32)
    # gradients of A and B (summed over layers) agree
    model(x).square().sum().backward()
    peft_model(x).square().sum().backward()
    ours = sorted(p.grad.norm().item() for n, p in model.named_parameters() if ".adapters." in n)
    theirs = sorted(p.grad.norm().item() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert ours == pytest.approx(theirs, rel=1e-4)  # fp32 norms of sums taken in another order: ~1e-6 apart
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(lorakit.unload(model, merge=True)(x), merged(x), **FP32)


def test_lorakit_adapter_gives_the_same_outputs_in_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    model = _adapted(case)
    x = _inputs(case[1])
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(_base(case[1]), tmp_path).eval()
    torch.testing.assert_close(peft_model(x), model(x), **FP32)


# ----- LoRA on MoE experts (target_parameters), both directions, every MoE architecture of the matrix -------------
@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_peft_expert_adapter_gives_the_same_outputs_gradients_and_merge(arch, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    torch.manual_seed(5)  # PEFT's own random A and B
    peft_model = peft.get_peft_model(tiny_moe(arch), cfg).eval()
    peft_model.save_pretrained(tmp_path)
    model = tiny_moe(arch)
    lorakit.load_adapter(model, tmp_path)
    x = token_ids()
    torch.testing.assert_close(model(x).logits, peft_model(x).logits, **FP32)
    model(x).logits.square().mean().backward()
    peft_model(x).logits.square().mean().backward()
    ours = sorted(p.grad.norm().item() for n, p in model.named_parameters() if ".adapters." in n)
    theirs = sorted(p.grad.norm().item() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert len(ours) == 4 and ours == pytest.approx(theirs, rel=1e-4)  # 2 stacks x (A, B)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(lorakit.unload(model, merge=True)(x).logits, merged(x).logits, **FP32)


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_lorakit_expert_adapter_gives_the_same_outputs_in_peft(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_moe(arch)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"],
                                               target_parameters="all-experts"))
    _randomize(model, "default", seed=3)
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_moe(arch), tmp_path).eval()
    x = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, model(x).logits, **FP32)


# ----- trainable tokens (PEFT's trainable_token_indices / TRAINABLE_TOKENS), both directions --------------------
TOKEN_IDS = [3, 5, 17]
TOKEN_CASES = {  # name: (tied embeddings, PEFT config kwargs or None for TRAINABLE_TOKENS alone)
    "lora+tokens-tied": (True, {"target_modules": ["q_proj"], "trainable_token_indices": TOKEN_IDS}),
    "lora+tokens-untied": (False, {"target_modules": ["v_proj"],
                                   "trainable_token_indices": {"embed_tokens": TOKEN_IDS, "lm_head": [4, 6]}}),
    "tokens-alone-tied": (True, None),
}


def _token_input():
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    x[0, :5] = torch.tensor([3, 5, 17, 4, 6])
    return x


def _peft_token_model(name):
    peft = pytest.importorskip("peft")
    tied, kwargs = TOKEN_CASES[name]
    cfg = peft.TrainableTokensConfig(token_indices=TOKEN_IDS) if kwargs is None else \
        peft.LoraConfig(r=4, init_lora_weights=False, **kwargs)
    model = peft.get_peft_model(token_llama(tied), cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _lorakit_token_model(name):
    tied, kwargs = TOKEN_CASES[name]
    kwargs = kwargs or {"target_modules": [], "trainable_token_indices": TOKEN_IDS}
    model = lorakit.add_lora(token_llama(tied), lorakit.LoraConfig(r=4, **kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns about tied embeddings
@pytest.mark.parametrize("name", list(TOKEN_CASES))
def test_token_adapters_move_both_ways_with_equal_outputs(name, tmp_path):
    import json

    x = _token_input()
    theirs = _peft_token_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    model = token_llama(TOKEN_CASES[name][0])
    lorakit.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(x).logits, theirs(x).logits, **FP32)
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    torch.testing.assert_close(merged(x).logits, theirs.merge_and_unload()(x).logits, **FP32)

    ours = _lorakit_token_model(name)
    lorakit.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == ("LORA" if TOKEN_CASES[name][1] else "TRAINABLE_TOKENS")
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(token_llama(TOKEN_CASES[name][0]), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, **FP32)
    assert not torch.allclose(ours(x).logits, token_llama(TOKEN_CASES[name][0])(x).logits, **FP32)
