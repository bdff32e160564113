"""Model-level API over the table of tiny models: freeze, merge, unload, switch, per-row, combine."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.core.saved import SavedModule
from tests.conftest import MLP, TOL, build, randomize_lora


def _base_of(case, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return case.build().to(dtype)


def test_fresh_adapter_output_is_bit_identical_to_base(case):
    base = _base_of(case)
    inputs = case.inputs(3)
    expected = case.run(base, inputs)
    model = build(case)
    assert torch.equal(case.run(model, inputs), expected)


def test_one_step_changes_only_trainable_parameters(case):
    model = build(case)
    randomize_lora(model)  # non-zero B so A receives gradient too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    case.run(model, case.inputs(4)).float().pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    adapter_params = {n for n in trainable if ".adapters.default." in n}
    assert adapter_params <= changed
    extra = trainable - adapter_params
    cfg = case.config
    if cfg.get("bias") == "lora_only":
        assert extra and all(n.endswith("base_layer.bias") for n in extra)
    elif cfg.get("modules_to_save"):
        assert extra and all(".copies.default." in n for n in extra)
    else:
        assert not extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged_and_unmerge_restores(case, dtype):
    model = build(case, dtype=dtype)
    randomize_lora(model, std=0.1)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs(3).items()}
    unmerged = case.run(model, inputs)
    lorakit.merge(model)
    merged = case.run(model, inputs)
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 4)  # bf16 merge rounds W + BA once more
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=tol)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in base_weights:
            if dtype == torch.float32:
                torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)
            else:  # bf16: W + d - d rounds twice; within one bf16 ulp of |W| + |d|
                assert (p.float() - base_weights[n].float()).abs().max() < 2e-2


def test_unload_without_merge_gives_original_model_bit_for_bit(case):
    base = _base_of(case)
    model = build(case)
    randomize_lora(model)
    lorakit.merge(model)
    lorakit.unmerge(model)
    model = build(case)  # never merged: bit-for-bit
    randomize_lora(model)
    restored = lorakit.unload(model, merge=False)
    assert restored is model
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in restored.modules())
    assert [type(m) for m in restored.modules()] == [type(m) for m in base.modules()]
    base_sd, sd = base.state_dict(), restored.state_dict()
    assert base_sd.keys() == sd.keys()
    assert all(torch.equal(base_sd[k], sd[k]) for k in sd)


def test_unload_with_merge_keeps_the_adapted_function(case):
    model = build(case)
    randomize_lora(model)
    inputs = case.inputs(3)
    expected = case.run(model, inputs)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in plain.modules())
    torch.testing.assert_close(case.run(plain, inputs), expected, atol=1e-5, rtol=1e-5)


def test_disabled_equals_base_and_restores(case):
    base = _base_of(case)
    model = build(case)
    randomize_lora(model)
    inputs = case.inputs(3)
    adapted = case.run(model, inputs)
    with warnings.catch_warnings():  # mlp trains biases (bias="lora_only"): disabled() warns, biases untrained here
        warnings.simplefilter("ignore")
        with lorakit.disabled(model):
            assert torch.equal(case.run(model, inputs), case.run(base, inputs))
    assert torch.equal(case.run(model, inputs), adapted)


def test_disabled_refuses_merged_model():
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    lorakit.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), lorakit.disabled(model):
        pass


def _two_adapters(case):
    model = build(case, bias="none")  # several adapters cannot share trained base biases
    cfg = lorakit.LoraConfig(r=2, alpha=4, **{**case.config, "bias": "none"})
    lorakit.add_lora(model, cfg, adapter="other")
    randomize_lora(model, seed=3)
    return model


def test_switch_use_adapter_and_delete(case):
    model = _two_adapters(case)
    assert lorakit.adapter_names(model) == ["default", "other"]
    assert lorakit.active_adapter(model) == "other"
    inputs = case.inputs(2)
    out_other = case.run(model, inputs)
    with lorakit.use_adapter(model, "default"):
        out_default = case.run(model, inputs)
    assert torch.equal(case.run(model, inputs), out_other)  # restored
    assert not torch.allclose(out_default, out_other)
    lorakit.set_adapter(model, "default")
    assert torch.equal(case.run(model, inputs), out_default)
    lorakit.delete_adapter(model, "other")
    assert lorakit.adapter_names(model) == ["default"]
    assert torch.equal(case.run(model, inputs), out_default)
    lorakit.delete_adapter(model, "default")
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in model.modules())
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        lorakit.set_adapter(model, "nope")


def test_per_row_adapters_equal_each_row_alone(case):
    model = _two_adapters(case)
    names = ["default", None, "other", "default", "other"]
    inputs = case.inputs(len(names))
    with lorakit.per_row_adapters(model, names):
        out = case.run(model, inputs)
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if name is None:
            with lorakit.disabled(model):
                expected = case.run(model, row)
        else:
            with lorakit.use_adapter(model, name):
                expected = case.run(model, row)
        torch.testing.assert_close(out[i:i + 1], expected, atol=1e-5, rtol=1e-5)


def test_per_row_rejects_wrong_batch_and_unknown_name():
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(KeyError, match="'b'"), lorakit.per_row_adapters(model, ["default", "b"]):
        pass
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3"), \
            lorakit.per_row_adapters(model, ["default", None]):
        model(torch.randn(3, 12))


def _delta(model, name):
    return {id(m): m.delta_weight(name) for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters}


@pytest.mark.parametrize("how", ["cat", "svd", "linear"])
def test_combine_adapters_follow_their_formulas(how):
    torch.manual_seed(0)
    model = MLP()
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, alpha=6, target_modules=["fc1", "fc2"]), "a")
    lorakit.add_lora(model, lorakit.LoraConfig(r=3 if how == "linear" else 2, alpha=2,
                                               target_modules=["fc1", "fc2"]), "b")
    randomize_lora(model)
    w = {"a": 0.7, "b": -0.4}
    lorakit.combine_adapters(model, w, "mix", how=how, rank=5 if how == "svd" else None)
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        da, db, dm = (layer.delta_weight(n) for n in ("a", "b", "mix"))
        if how in ("cat", "svd"):  # exact: rank 5 covers ranks 3 + 2
            torch.testing.assert_close(dm, 0.7 * da + -0.4 * db, atol=1e-5, rtol=1e-5)
        else:
            sa, sb = layer.adapters["a"], layer.adapters["b"]
            ca, cb = (0.7 * sa.scaling) ** 0.5, (0.4 * sb.scaling) ** 0.5
            A = ca * sa.lora_A.weight + cb * sb.lora_A.weight
            B = ca * sa.lora_B.weight - cb * sb.lora_B.weight
            torch.testing.assert_close(dm, B @ A, atol=1e-5, rtol=1e-5)


def test_combine_svd_truncates_to_best_low_rank():
    torch.manual_seed(0)
    model = MLP()
    for n in ("a", "b"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["fc2"]), n)
    randomize_lora(model)
    lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "mix", how="svd", rank=2)
    layer = model.fc2
    full = layer.delta_weight("a") + layer.delta_weight("b")
    S = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(layer.delta_weight("mix") - full).item()
    assert err == pytest.approx(S[2:].pow(2).sum().sqrt().item(), rel=1e-4)  # Eckart-Young


def test_trainable_parameters_llama2_7b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 4_194_304  # 32 layers x 2 modules x (8*4096 + 4096*8)
    assert total == 6_738_415_616 + trainable


def test_trainable_parameters_roberta_base_on_meta():
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        model = RobertaModel(RobertaConfig(), add_pooling_layer=False)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["query", "value"]))
    assert lorakit.trainable_parameters(model)[0] == 294_912  # 12 x 2 x (8*768 + 768*8)


def test_trainable_parameters_gpt3_175b_slices_on_meta():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=12288, n_layer=96, n_head=96, vocab_size=50257, n_positions=2048)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["c_attn"], slices={"c_attn": [True, False, True]}))
    assert lorakit.trainable_parameters(model)[0] == 37_748_736  # the paper's 37.7M (Wq, Wv, r=8)


def test_no_match_lists_linear_modules():
    with pytest.raises(ValueError) as e:
        lorakit.add_lora(MLP(), lorakit.LoraConfig(target_modules=["q_proj"]))
    msg = str(e.value)
    assert "q_proj" in msg and "fc1" in msg and "head" in msg


def test_an_exclusion_that_removes_every_match_says_so():
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"exclude_modules=\['fc1'\] removes every module target_modules=\['fc1'\] "
                                         r"matches \(1: fc1\)"):
        lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["fc1"], exclude_modules=["fc1"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_target_selection_regex_exclude_layers_all_linear():
    from tests.conftest import llama

    model = llama()
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=r".*\.(q|k)_proj", exclude_modules=["k_proj"], layers=[1]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped == ["model.layers.1.self_attn.q_proj"]
    model = llama()
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules="all-linear"))
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head


def test_default_targets_for_known_architectures():
    from tests.conftest import gpt2

    model = lorakit.add_lora(gpt2(), lorakit.LoraConfig(r=2))
    assert {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)} == {"c_attn"}


def test_bias_all_trains_every_bias():
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc1.base_layer.bias", "fc2.bias", "head.bias"} <= trainable
    assert "fc2.weight" not in trainable


def test_config_validation_messages():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lorakit.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias must be"):
        lorakit.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="dropout"):
        lorakit.LoraConfig(dropout=1.5)
    with pytest.raises(ValueError, match="regex"):
        lorakit.LoraConfig(target_modules="(")
    with pytest.raises(ValueError, match="already exists"):
        model = lorakit.add_lora(MLP(), lorakit.LoraConfig(target_modules=["fc1"]))
        lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["fc1"]))


def test_modules_to_save_holding_a_target_is_refused_and_model_untouched():
    from tests.conftest import llama

    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["model.layers.0"])
    with pytest.raises(ValueError, match=r"'model\.layers\.0' contains the LoRA target 'model\.layers\.0\.self_attn"):
        lorakit.add_lora(model, cfg)
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_caller_config_is_not_mutated():
    cfg = lorakit.LoraConfig(r=2, target_modules=["fc1"], rank_pattern={"fc1": 3})
    snapshot = copy.deepcopy(cfg)
    model = lorakit.add_lora(MLP(), cfg)
    assert cfg == snapshot
    assert model.fc1.adapters["default"].rank == 3


def test_merge_safe_refuses_non_finite_and_changes_nothing():
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        model.fc2.adapters["default"].lora_B.weight[0, 0] = float("inf")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite.*fc2"):
        lorakit.merge(model, safe=True)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not model.fc1.merged


def test_bf16_merge_computes_delta_in_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["0"]))
    randomize_lora(model, std=0.05)
    layer = model[0]
    exact = layer.base_layer.weight.float() + layer.delta_weight("default")
    lorakit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, exact.to(torch.bfloat16), atol=0, rtol=0)


def test_torch_compile_single_adapter_no_graph_breaks():
    torch._dynamo.reset()
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    randomize_lora(model)
    x = torch.randn(4, 12)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-6)


def test_modules_to_save_copy_trains_and_original_stays():
    from tests.conftest import bert

    torch.manual_seed(0)
    model = lorakit.add_lora(bert(), lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    holder = model.classifier
    assert isinstance(holder, SavedModule)
    assert not holder.original.weight.requires_grad and holder.copies["default"].weight.requires_grad
    with torch.no_grad():
        holder.copies["default"].weight.add_(1.0)
    unloaded = lorakit.unload(model, merge=True)
    assert isinstance(unloaded.classifier, nn.Linear)
    assert torch.equal(unloaded.classifier.weight, holder.copies["default"].weight)
