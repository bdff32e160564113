"""Where two features meet (issue #8): modes of new modules, per-row x disabled, combine x modules_to_save,
bias x several adapters, set/delete x requires_grad, and validate-then-commit for every model change."""

import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))


def C(**kw):
    return lorakit.LoraConfig(target_modules=["0"], **kw)


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


def _visible(model, seed=1):
    """Non-zero B everywhere so each adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.adapters.values():
                    adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g))


def snapshot(model):
    """Everything a failed call must leave as it was."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, lorakit.adapter_names(model),
            lorakit.active_adapter(model), [(n, type(m), m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model, before):
    sd, names, active, modules, grads = snapshot(model)
    assert (names, active, modules, grads) == before[1:]
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)


# ----- item 1: new modules follow the model's mode -----------------------------------------------------------
def test_adapter_loaded_into_an_eval_model_runs_without_dropout(tmp_path):
    model = lorakit.add_lora(mlp(), C(dropout=0.5, modules_to_save=["2"]))
    _visible(model)
    lorakit.save_adapter(model, tmp_path)
    fresh = mlp().eval()
    lorakit.load_adapter(fresh, tmp_path)
    assert not any(m.training for m in fresh.modules())
    assert torch.equal(fresh(X), fresh(X))  # dropout(0.5) in training mode would differ between calls
    train = mlp().train()
    lorakit.add_lora(train, C(dropout=0.5))
    assert all(m.training for m in train.modules())


def test_combined_adapter_follows_the_layer_mode():
    model = lorakit.add_lora(mlp(), C(dropout=0.5)).eval()
    lorakit.combine_adapters(model, {"default": 1.0}, "c")
    assert not model[0].adapters["c"].training


# ----- item 2 and 3: per-row adapters ------------------------------------------------------------------------
def test_disabled_wins_over_per_row_adapters():
    base = mlp()
    model = lorakit.add_lora(mlp(), C(modules_to_save=["2"]))
    _visible(model)
    with torch.no_grad():
        model[2].copies["default"].weight.add_(1.0)
    with lorakit.disabled(model), lorakit.per_row_adapters(model, ["default"] * 4):
        assert torch.equal(model(X), base(X))
    with lorakit.per_row_adapters(model, ["default"] * 4), lorakit.disabled(model):
        assert torch.equal(model(X), base(X))


def test_per_row_refuses_a_recurrent_modules_to_save_clearly():
    model = nn.Sequential(nn.Linear(10, 10), nn.GRU(10, 5))
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0"], modules_to_save=["1"]))
    with pytest.raises(ValueError, match="recurrent module"), lorakit.per_row_adapters(model, ["default"] * 4):
        pass
    assert model[0].row_plan is None  # nothing left set


def test_per_row_names_a_modules_to_save_returning_a_tuple():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 10)

        def forward(self, x):
            return self.lin(x), x

    model = nn.Sequential(nn.Linear(10, 10), Pair())
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0"], modules_to_save=["1"]))
    with pytest.raises(TypeError, match="Pair returned tuple"), lorakit.per_row_adapters(model, ["default"] * 4):
        model(X)


# ----- item 4: combine x modules_to_save ---------------------------------------------------------------------
def test_combine_keeps_the_one_trained_modules_to_save_copy():
    model = lorakit.add_lora(mlp(), C(modules_to_save=["2"]))
    lorakit.add_lora(model, C(), adapter="other")
    _visible(model)
    with torch.no_grad():
        model[2].copies["default"].weight.add_(1.0)
    lorakit.combine_adapters(model, {"default": 1.0, "other": 1.0}, "merged", how="cat")
    with lorakit.use_adapter(model, "merged"):
        out = model(X)
    head = model[2].copies["default"]
    hidden = torch.relu(model[0].base_layer(X) + sum(model[0].adapters[a](X) for a in ("default", "other")))
    # the combined update is the sum of both (cat is exact): fp32 summation order only, 1e-5
    torch.testing.assert_close(out, head(hidden), atol=1e-5, rtol=1e-5)


def test_combine_refuses_two_adapters_training_the_same_module():
    model = lorakit.add_lora(mlp(), C(modules_to_save=["2"]))
    lorakit.add_lora(model, C(modules_to_save=["2"]), adapter="other")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['default', 'other'\] both train modules_to_save '2'"):
        lorakit.combine_adapters(model, {"default": 1.0, "other": 1.0}, "merged")
    assert_unchanged(model, before)


# ----- item 6 and 10: what trains ----------------------------------------------------------------------------
def test_set_adapter_makes_the_active_adapter_the_trainable_one():
    model = lorakit.add_lora(mlp(), C(modules_to_save=["2"]), adapter="a")
    lorakit.add_lora(model, C(modules_to_save=["2"]), adapter="b")
    lorakit.set_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.adapters.a.lora_A.weight", "0.adapters.a.lora_B.weight", "2.copies.a.weight",
                         "2.copies.a.bias"}
    model(X).sum().backward()  # raised "element 0 of tensors does not require grad" before
    with lorakit.use_adapter(model, "b"):
        assert model[0].adapters["b"].lora_A.weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # restored


def test_deleting_the_active_adapter_activates_a_remaining_one():
    model = lorakit.add_lora(mlp(), C(), adapter="a")
    lorakit.add_lora(model, C(), adapter="b")
    _visible(model)
    with pytest.warns(UserWarning, match="'a' is active now"):
        lorakit.delete_adapter(model, "b")
    assert lorakit.active_adapter(model) == "a"
    with lorakit.use_adapter(model, "a"):
        expected = model(X)
    assert torch.equal(model(X), expected)
    assert model[0].adapters["a"].lora_A.weight.requires_grad


def test_disabled_turns_adapter_gradients_off_and_back_on():
    model = lorakit.add_lora(mlp(), C(modules_to_save=["2"]))
    with lorakit.disabled(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert model[0].adapters["default"].lora_A.weight.requires_grad and model[2].copies["default"].weight.requires_grad


# ----- items 7, 8, 9: biases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("first, second", [("all", "none"), ("none", "lora_only"), ("lora_only", "all")])
def test_a_second_adapter_cannot_share_trained_biases(first, second):
    model = lorakit.add_lora(mlp(), C(bias=first), adapter="a")
    before = snapshot(model)
    with pytest.raises(ValueError, match="only a model's single adapter may train the"):
        lorakit.add_lora(model, C(bias=second), adapter="b")
    assert_unchanged(model, before)


def test_disabled_warns_when_biases_were_trained():
    model = lorakit.add_lora(mlp(), C(bias="lora_only"))
    with pytest.warns(UserWarning, match="bias='lora_only'"), lorakit.disabled(model):
        pass
    plain = lorakit.add_lora(mlp(), C())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lorakit.disabled(plain):
            pass


def test_adapted_layer_exposes_the_base_bias():
    model = lorakit.add_lora(mlp(), C())
    assert model[0].bias is model[0].base_layer.bias and model[0].weight is model[0].base_layer.weight


# ----- item 12: listed names that cannot be adapted ------------------------------------------------------------
def test_a_listed_name_matching_only_unadaptable_modules_is_named():
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)
            self.lin0 = nn.Linear(8, 8)

    model = WithAttention()
    with pytest.raises(ValueError, match="'mha' matches only modules lorakit cannot adapt .MultiheadAttention"):
        lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["mha", "lin0"]))
    assert isinstance(model.lin0, nn.Linear) and not isinstance(model.lin0, LoraLayer)
    # a name the model lacks altogether stays allowed (PEFT-style lists name several architectures)
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["lin0", "q_proj"]))


# ----- item 13: validate, then commit ------------------------------------------------------------------------
def test_add_and_load_while_merged_change_nothing(tmp_path):
    lorakit.save_adapter(lorakit.add_lora(mlp(), C()), tmp_path)
    model = lorakit.add_lora(mlp(), C(), adapter="a")
    _visible(model)
    lorakit.merge(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="merged"):
        lorakit.add_lora(model, C(), adapter="b")
    with pytest.raises(RuntimeError, match="merged"):
        lorakit.load_adapter(model, tmp_path, adapter="b")
    assert_unchanged(model, before)


def test_combine_whose_ranks_differ_in_a_later_layer_changes_nothing():
    model = mlp()
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0", "2"]), adapter="a")
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0", "2"], rank_pattern={"2": 4}), adapter="b")
    before = snapshot(model)
    with pytest.raises(ValueError, match="at 2: how='linear' needs adapters of equal rank"):
        lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "c")
    assert_unchanged(model, before)
    lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "c", how="cat")  # a retry under another method works
    assert lorakit.adapter_names(model) == ["a", "b", "c"]


def test_set_adapter_while_merged_changes_nothing():
    model = mlp()
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0"]), adapter="a")
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0", "2"]), adapter="b")
    lorakit.merge(model, "b")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="merged"):
        lorakit.set_adapter(model, "a")
    assert_unchanged(model, before)


# ----- item 15: non-finite results ---------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["merge", "unload"])
def test_non_finite_merges_are_refused(call):
    model = lorakit.add_lora(mlp(), C())  # a scaling that is not finite is refused by add_lora itself
    with torch.no_grad():
        model[0].adapters["default"].lora_A.weight.fill_(1e30)
        model[0].adapters["default"].lora_B.weight.fill_(1e30)  # B·A: 8 · 1e60, inf in fp32
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite weights in 0"):
        lorakit.merge(model) if call == "merge" else lorakit.unload(model, merge=True)
    assert_unchanged(model, before)


def test_merge_checks_finiteness_in_the_model_dtype():
    model = lorakit.add_lora(mlp().half(), C())
    with torch.no_grad():
        model[0].adapters["default"].lora_B.weight.fill_(300.0)  # B·A·s ~ 1e5: finite in fp32, inf in fp16
        model[0].adapters["default"].lora_A.weight.fill_(300.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="torch.float16"):
        lorakit.merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), True, "1"])
def test_combine_refuses_non_finite_weights(weight):
    model = lorakit.add_lora(mlp(), C())
    before = snapshot(model)
    with pytest.raises(ValueError, match="must be a finite number"):
        lorakit.combine_adapters(model, {"default": weight}, "c")
    assert_unchanged(model, before)


# ----- the same class elsewhere: nested contexts, deleting beside a merged adapter --------------------------------
def test_nested_disabled_and_per_row_contexts_restore_the_outer_state():
    base = mlp()
    model = lorakit.add_lora(mlp(), C())
    _visible(model)
    with lorakit.disabled(model):
        with lorakit.disabled(model):
            pass
        assert torch.equal(model(X), base(X))  # still disabled after the inner exit
    rows = ["default", None, "default", None]
    with lorakit.per_row_adapters(model, rows):
        expected = model(X)
        with lorakit.per_row_adapters(model, ["default"] * 4):
            pass
        assert torch.equal(model(X), expected)


def test_deleting_the_active_adapter_beside_a_merged_one_changes_nothing_else():
    model = lorakit.add_lora(mlp(), C(), adapter="a")
    lorakit.add_lora(model, C(), adapter="b")
    lorakit.add_lora(model, C(), adapter="c")
    lorakit.merge(model, "b")  # b merged while c is active
    with pytest.warns(UserWarning, match="'b' is active now"):
        lorakit.delete_adapter(model, "c")
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapter(model) == "b"


def test_combine_checks_finiteness_in_the_adapter_dtype():
    model = lorakit.add_lora(mlp().half(), C())
    with torch.no_grad():
        model[0].adapters["default"].lora_B.weight.fill_(60000.0)  # finite in fp16 (max 65504)
    before = snapshot(model)
    with pytest.raises(ValueError, match="not finite at 0 .torch.float16"):  # cat with weight 2: 120000, inf
        lorakit.combine_adapters(model, {"default": 2.0}, "c", how="cat")
    assert_unchanged(model, before)


@pytest.mark.parametrize("context", ["disabled", "per_row"])
@pytest.mark.parametrize("call", ["add", "delete", "merge", "unload"])
def test_no_adapter_or_weight_change_inside_a_temporary_mode(context, call):
    model = lorakit.add_lora(mlp(), C(), adapter="a")
    lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["2"]), adapter="b")
    _visible(model)
    mode = lorakit.disabled(model) if context == "disabled" else lorakit.per_row_adapters(model, ["a", "b", None, "a"])
    with mode:
        before = snapshot(model)
        expected = model(X)
        with pytest.raises(RuntimeError, match="inside"):
            {"add": lambda: lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["2"]), adapter="c"),
             "delete": lambda: lorakit.delete_adapter(model, "b"),
             "merge": lambda: lorakit.merge(model),
             "unload": lambda: lorakit.unload(model, merge=True)}[call]()
        assert_unchanged(model, before)
        assert torch.equal(model(X), expected)


def test_targeting_another_adapters_modules_to_save_is_named():
    model = lorakit.add_lora(mlp(), C(modules_to_save=["2"]), adapter="a")
    with pytest.raises(ValueError, match="'2' names a module another adapter trains in full"):
        lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0", "2"]), adapter="b")
    assert lorakit.adapter_names(model) == ["a"]


# ----- issue 17 item 1: a scaling finite in fp32 but not in the model's dtype --------------------------------------
def test_add_lora_refuses_a_scaling_that_overflows_the_model_dtype():
    model = mlp().half()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"scaling of 0: alpha=1e\+06 / r=8 = 125000 is not finite in torch.float16"):
        lorakit.add_lora(model, C(alpha=1e6))  # 125000 > 65504, fp16's largest value
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"scaling of 2: alpha=1e\+06 / r=8"):
        lorakit.add_lora(model, lorakit.LoraConfig(target_modules=["0", "2"], alpha_pattern={"2": 1e6}))
    assert_unchanged(model, before)
    lorakit.add_lora(model, C(alpha=5e5))  # 62500 fits fp16
    assert lorakit.adapter_names(model) == ["default"]
    assert lorakit.adapter_names(lorakit.add_lora(mlp(), C(alpha=1e6))) == ["default"]  # fine on an fp32 model
