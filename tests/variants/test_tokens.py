"""Trainable tokens (``trainable_token_indices``) on tiny random LLaMAs, tied and untied, against a plain-torch
reference: the base model with the chosen rows written into its embedding (and, tied, its head).

Tolerance: fp32 results that differ only in summation order (a gathered row vs the same row in the table, the
head's ``h @ R.T`` vs the full matmul) agree to 1e-5 at these sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.variants.tokens import TokenLayer, record_added_tokens

transformers = pytest.importorskip("transformers")
FP32 = {"atol": 1e-5, "rtol": 1e-5}
IDS = [3, 5, 17]


def llama(tied: bool = True):
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens_in_input():
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    x[0, :3] = torch.tensor(IDS)  # every trained id occurs
    return x


def randomize_rows(model, adapter="default", seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TokenLayer) and adapter in m.adapters and not m.adapters[adapter].tied:
                p = m.adapters[adapter].trainable_tokens_delta
                p.copy_(torch.randn(p.shape, generator=g))


def reference(rows: dict[str, torch.Tensor], tied: bool) -> torch.nn.Module:
    """The base model with the trained rows written into its tables (tied: the head follows, being the same)."""
    ref = llama(tied)
    with torch.no_grad():
        for path, r in rows.items():
            ref.get_submodule(path).weight[IDS] = r
    return ref


def trained_rows(model, adapter="default"):
    return {p: m.adapters[adapter].trainable_tokens_delta.detach().clone() for p, m in model.named_modules()
            if isinstance(m, TokenLayer) and adapter in m.adapters and not m.adapters[adapter].tied}


@pytest.mark.parametrize("tied", [True, False])
def test_new_adapter_changes_nothing_and_equals_the_reference_once_trained(tied):
    x = tokens_in_input()
    base = llama(tied)(x).logits
    model = lorakit.add_lora(llama(tied), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS))
    torch.testing.assert_close(model(x).logits, base, **FP32)
    assert isinstance(model.lm_head, TokenLayer) == tied  # a tied head follows the embedding, as in PEFT
    randomize_rows(model)
    ref = reference(trained_rows(model), tied)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight.normal_()
    out = model(x).logits
    ref_q = ref.model.layers[0].self_attn.q_proj
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        ref_q.weight += layer.delta_weight("default")
    torch.testing.assert_close(out, ref(x).logits, **FP32)
    assert not torch.allclose(out, base, **FP32)


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_chosen_rows_train(tied):
    model = lorakit.add_lora(llama(tied), lorakit.LoraConfig(target_modules=[], trainable_token_indices=IDS)).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["model.embed_tokens.adapters.default.trainable_tokens_delta"]
    assert lorakit.trainable_parameters(model)[0] == len(IDS) * 16
    table = model.model.embed_tokens.base_layer.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(tokens_in_input(), labels=tokens_in_input()).loss.backward()
    opt.step()
    assert torch.equal(model.model.embed_tokens.base_layer.weight, table)
    rows = model.model.embed_tokens.adapters["default"].trainable_tokens_delta
    assert not torch.equal(rows, table[IDS]) and (rows - table[IDS]).abs().amax(1).gt(0).all()


@pytest.mark.parametrize("tied", [True, False])
def test_merge_unload_disabled_save_load(tied, tmp_path):
    x = tokens_in_input()
    base = llama(tied)(x).logits
    config = lorakit.LoraConfig(target_modules=["v_proj"], trainable_token_indices=IDS, modules_to_save=["norm"])
    model = lorakit.add_lora(llama(tied), config)
    randomize_rows(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.adapters["default"].lora_B.weight.normal_()
        model.model.norm.copies["default"].weight.add_(0.5)  # modules_to_save beside token rows
    out = model(x).logits
    with lorakit.disabled(model):
        assert torch.equal(model(x).logits, base)
    lorakit.save_adapter(model, tmp_path)
    fresh = llama(tied)
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, **FP32)
    lorakit.merge(fresh)
    torch.testing.assert_close(fresh(x).logits, out, **FP32)
    lorakit.unmerge(fresh)
    assert torch.equal(fresh.model.embed_tokens.base_layer.weight, llama(tied).model.embed_tokens.weight)
    plain = lorakit.unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, out, **FP32)
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied  # the tie survives the merge
    assert torch.equal(lorakit.unload(model, merge=False)(x).logits, base)


def test_several_adapters_switch_and_delete():
    x = tokens_in_input()
    base = llama()(x).logits
    model = lorakit.add_lora(llama(), lorakit.LoraConfig(target_modules=[], trainable_token_indices=IDS), "rows")
    randomize_rows(model, "rows")
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7]), "other")
    randomize_rows(model, "other", seed=3)
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["q_proj"]), "lora")
    with lorakit.use_adapter(model, "rows"):
        rows_out = model(x).logits
    torch.testing.assert_close(rows_out, reference(trained_rows(model, "rows"), True)(x).logits, **FP32)
    with lorakit.use_adapter(model, "lora"):  # no token rows of its own: the table as it is
        torch.testing.assert_close(model(x).logits, base, **FP32)
    lorakit.set_adapter(model, "other")
    assert [n for n, p in model.named_parameters() if p.requires_grad and "embed" in n] == \
        ["model.embed_tokens.adapters.other.trainable_tokens_delta"]
    with pytest.warns(UserWarning, match="deleted the active adapter"):
        lorakit.delete_adapter(model, "other")
        lorakit.delete_adapter(model, "rows")
    assert not isinstance(model.model.embed_tokens, TokenLayer) and not isinstance(model.lm_head, TokenLayer)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_refused_by_name():
    model = lorakit.add_lora(llama(), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS), "a")
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["q_proj"]), "b")
    with lorakit.per_row_adapters(model, ["b", None]):  # per-row batches with token rows: tests/ops/test_token_rows.py
        model(tokens_in_input())
    with pytest.raises(ValueError, match="adapter 'a' is a TokenAdapter, not a plain"):
        lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "ab")
    cases = [
        ({"target_modules": ["embed_tokens"], "trainable_token_indices": IDS}, "LoRA target and has trainable tokens"),
        ({"target_modules": ["q_proj"], "trainable_token_indices": [40]}, "token id 40 is out of range"),
        ({"target_modules": [], "trainable_token_indices": IDS, "modules_to_save": ["embed_tokens"]},
         "trained in full"),
        ({"target_modules": [], "trainable_token_indices": {"embed_tokens": [3], "lm_head": [4]}}, "is tied to"),
        ({"target_modules": [], "trainable_token_indices": {"nothing": [3]}}, "must name one module"),
    ]
    for kwargs, message in cases:
        fresh = llama()
        with pytest.raises(ValueError, match=message):
            lorakit.add_lora(fresh, lorakit.LoraConfig(**kwargs))
        assert not any(isinstance(m, LoraLayer) for m in fresh.modules())  # untouched
    with pytest.raises(ValueError, match="trainable_token_indices must be"):
        lorakit.LoraConfig(trainable_token_indices=[3, 3])
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        lorakit.LoraConfig(target_modules=[])
    lora_head = lorakit.add_lora(llama(False), lorakit.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="'lm_head' holds LoRA adapters"):
        lorakit.add_lora(lora_head, lorakit.LoraConfig(target_modules=[], trainable_token_indices={"lm_head": [3]}),
                         "t")


def test_added_tokens_are_recorded_and_checked(tmp_path):
    model = lorakit.add_lora(llama(), lorakit.LoraConfig(target_modules=[], trainable_token_indices=[38, 39]))
    with pytest.raises(ValueError, match=r"added token ids \[12\] are not trained"):
        record_added_tokens(model, {"<x>": 12})
    record_added_tokens(model, {"<a>": 38, "<b>": 39})
    lorakit.save_adapter(model, tmp_path)
    from lorakit.core.checkpoint import read_adapter

    _, raw, _ = read_adapter(tmp_path)
    assert raw["lorakit"]["added_tokens"] == {"<a>": 38, "<b>": 39} and raw["lorakit"]["vocab_size"] == 40


def test_token_rows_on_a_4bit_base():
    """QLoRA: the linear layers in NF4, the embedding (and tied head) full precision with their trained rows; the
    same quantization of the reference gives the same output (identical codes; fp32 tolerance)."""
    pytest.importorskip("bitsandbytes")
    from lorakit.variants.quantized import PRESETS

    x = tokens_in_input()
    model = lorakit.add_lora(llama(), lorakit.LoraConfig(target_modules=[], trainable_token_indices=IDS))
    randomize_rows(model)
    ref = reference(trained_rows(model), True)
    lorakit.quantize(model, **PRESETS["nf4"])
    lorakit.quantize(ref, **PRESETS["nf4"])
    torch.testing.assert_close(model(x).logits, ref(x).logits, **FP32)
    model.train()
    model(x, labels=x).loss.backward()
    assert model.model.embed_tokens.adapters["default"].trainable_tokens_delta.grad.abs().sum() > 0
