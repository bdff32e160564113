"""AdaLoRA: the SVD-form adapter, the allocator's formulas on small tensors, export as plain LoRA (lorakit
and PEFT load it with equal outputs), PEFT AdaLoRA checkpoints, and AdaLoRA meeting the rest of lorakit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.checkpoint import CONFIG_NAME, CheckpointError
from lorakit.variants.adalora import SVDAdapter, budget_schedule, svd_adapters
from tests.conftest import MLP, TOL, ConvNet, EmbNet, gpt2

# fp32: every path below is a rank-<=6 matmul pair on 12-24 features; only summation order differs.
ATOL = TOL[torch.float32]


def _x(b: int = 5) -> torch.Tensor:
    return torch.randn(b, 12, generator=torch.Generator().manual_seed(b))


def _ada(seed: int = 0, r: int = 6, targets=("fc1", "fc2"), name: str = "default", model=None, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = model if model is not None else MLP()
    lorakit.add_lora(model, lorakit.AdaLoraConfig(r=r, alpha=float(r), target_modules=list(targets), **kw), name)
    return model


def _randomize(model: nn.Module, name: str = "default", seed: int = 1, zeros: int = 2) -> None:
    """Random P, Q, λ with the first ``zeros`` λ of each layer set to 0 (pruned triplets)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in svd_adapters(model, name).values():
            for p in (a.lora_A.weight, a.lora_B.weight, a.lora_E):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            a.lora_E[:zeros] = 0


def _train(model: nn.Module, alloc, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for t in range(1, steps + 1):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y) + alloc.regularization()
        loss.backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()


# ----- the adapter -----------------------------------------------------------------------------------------
def test_forward_is_P_diag_lambda_Q_and_starts_at_the_base_model():
    model = _ada()
    base = MLP()
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "adapters" not in k})
    x = _x()
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)  # Λ = 0: the update is exactly zero
    _randomize(model)
    a = model.fc1.adapters["default"]
    P, lam, Q = a.lora_B.weight, a.lora_E[:, 0], a.lora_A.weight
    h = model.fc1(x)
    expected = base.fc1(x) + x @ (P @ torch.diag(lam) @ Q).T * a.scaling
    torch.testing.assert_close(h, expected, atol=ATOL, rtol=ATOL)
    assert a.scaling == 1.0 and a.live_rank == 4  # alpha = r; two of six λ are zero


def test_only_linear_layers_take_adalora_and_a_refusal_changes_nothing():
    for model, targets in ((ConvNet(), ["conv1", "head"]), (EmbNet(), ["embed", "proj"])):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="AdaLoRA is not supported on (Conv1d|Embedding)"):
            lorakit.add_lora(model, lorakit.AdaLoraConfig(r=2, target_modules=targets))
        assert lorakit.adapter_names(model) == []
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for bad, message in (({"slices": {"c_attn": [True, False, True]}}, "fused slices"),
                         ({"use_dora": True}, "AdaLoRA and DoRA"), ({"init": "pissa"}, "init 'pissa' is not")):
        with pytest.raises(ValueError, match=message):
            lorakit.AdaLoraConfig(r=2, target_modules=["c_attn"], **bad)
    model = gpt2()  # GPT-2's Conv1D is linear-like
    lorakit.add_lora(model, lorakit.AdaLoraConfig(r=2, target_modules=["c_attn"]))
    assert isinstance(model.transformer.h[0].attn.c_attn.adapters["default"], SVDAdapter)


def test_regularization_is_the_squared_frobenius_orthogonality_penalty():
    model = _ada()
    _randomize(model)
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=10, orth_reg_weight=0.3)
    terms = []
    for a in svd_adapters(model, "default").values():
        P, Q = a.lora_B.weight, a.lora_A.weight
        eye = torch.eye(6)
        terms.append(sum(((P.T @ P - eye)[i, j]) ** 2 for i in range(6) for j in range(6))
                     + sum(((Q @ Q.T - eye)[i, j]) ** 2 for i in range(6) for j in range(6)))
    torch.testing.assert_close(alloc.regularization(), 0.3 * (terms[0] + terms[1]) / 2, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop's bf16 autocast: the penalty stays fp32
        in_autocast = alloc.regularization()
    assert torch.equal(in_autocast, alloc.regularization())
    with torch.no_grad():  # orthonormal columns of P and rows of Q: no penalty
        for a in svd_adapters(model, "default").values():
            a.lora_B.weight.copy_(torch.linalg.qr(torch.randn(24, 6))[0])
            a.lora_A.weight.copy_(torch.linalg.qr(torch.randn(a.lora_A.weight.shape[1], 6))[0].T)
    assert alloc.regularization().item() < 1e-10
    alloc.regularization().backward()  # differentiable in P and Q
    assert model.fc1.adapters["default"].lora_B.weight.grad is not None


# ----- the allocator: schedule, importance, masking ------------------------------------------------------
def test_budget_schedule_follows_the_cubic_formula():
    b0, bT, T, ti, tf = 24, 8, 100, 10, 20
    values = [budget_schedule(t, b0, bT, T, ti, tf) for t in range(1, T + 1)]
    assert values[:10] == [24] * 10  # t = 1..10: warm-up (t < tinit) and t = tinit itself
    assert budget_schedule(50, b0, bT, T, ti, tf) == 8 + math.floor(16 * (1 - 40 / 70) ** 3)  # = 9
    assert budget_schedule(45, b0, bT, T, ti, tf) == 8 + math.floor(16 * (1 - 35 / 70) ** 3)  # = 10
    assert values[79:] == [8] * 21  # t >= T - tfinal
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_importance_is_the_ema_of_sensitivity_times_uncertainty():
    model = _ada(r=3)
    _randomize(model, zeros=0)
    alloc = lorakit.AdaLoraAllocator(model, target_rank=1, total_steps=10, beta1=0.5, beta2=0.75)
    a = model.fc1.adapters["default"]
    params = {"A": a.lora_A.weight, "E": a.lora_E, "B": a.lora_B.weight}
    grads = [{k: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for k, p in params.items()}
             for i in range(2)]
    ipt = {k: torch.zeros(p.shape) for k, p in params.items()}
    unc = {k: torch.zeros(p.shape) for k, p in params.items()}
    for g in grads:
        for k, p in params.items():
            p.grad = g[k]
            sens = (p.detach() * g[k]).abs()
            ipt[k] = 0.5 * ipt[k] + 0.5 * sens
            unc[k] = 0.75 * unc[k] + 0.25 * (sens - ipt[k]).abs()
        alloc.update_importance()
    s = {k: ipt[k] * unc[k] for k in params}
    expected = s["E"][:, 0] + s["A"].mean(dim=1) + s["B"].mean(dim=0)
    torch.testing.assert_close(alloc.scores()["fc1"], expected, atol=1e-7, rtol=1e-6)
    assert "fc2" not in alloc.ipt  # no gradient there yet: not scored from stale values


def test_masking_keeps_exactly_the_budget_most_important_triplets_over_all_layers():
    model = _ada(r=4)
    _randomize(model, zeros=0)
    alloc = lorakit.AdaLoraAllocator(model, target_rank=1, total_steps=10)
    scores = {"fc1": torch.tensor([0.9, 0.1, 0.5, 0.2]), "fc2": torch.tensor([0.3, 0.8, 0.05, 0.6])}
    alloc.scores = lambda: scores
    kept_E = {p: a.lora_E.detach().clone() for p, a in svd_adapters(model, "default").items()}
    masks = alloc.mask_to_budget(3)  # top-3 of {.9, .1, .5, .2 | .3, .8, .05, .6} is {.9 | .8, .6}
    assert masks["fc1"].tolist() == [True, False, False, False]
    assert masks["fc2"].tolist() == [False, True, False, True]
    assert alloc.rank_pattern() == {"fc1": 1, "fc2": 2}
    for path, a in svd_adapters(model, "default").items():  # kept λ untouched, the others exactly 0
        torch.testing.assert_close(a.lora_E[:, 0], torch.where(masks[path], kept_E[path][:, 0], 0.0), atol=0, rtol=0)


def test_allocator_runs_the_three_phases_and_ends_on_the_target_budget():
    model = _ada(r=6)
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=24, tinit=4, tfinal=6, delta_t=3)
    budgets, live = [], []
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for t in range(1, 25):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        (nn.functional.cross_entropy(model(x), y) + alloc.regularization()).backward()
        opt.step()
        budgets.append(alloc.step(t))
        opt.zero_grad()
        live.append(sum(alloc.rank_pattern().values()))
    assert budgets[:5] == [12] * 5  # nothing pruned before tinit, and not before the first multiple of delta_t
    assert budgets[5] == budget_schedule(6, 12, 4, 24, 4, 6) < 12  # t = 6: first re-allocation
    assert budgets[6:8] == [budgets[5]] * 2  # held until the next one (t = 9)
    assert budgets[17:] == [4] * 7 and live[17:] == [4] * 7  # from T - tfinal = 18 on: the target, fixed
    assert all(n <= b for n, b in zip(live, budgets, strict=True))  # the mask holds between re-allocations
    frozen = alloc.mask
    assert alloc.step(30) == 4 and alloc.mask is frozen  # past T: still the final ranks


@pytest.mark.parametrize("kwargs, message", [
    ({"target_rank": 0}, "target_rank must be a positive integer"),
    ({"target_rank": True}, "target_rank must be a positive integer"),
    ({"target_rank": 7}, "exceeds the initial 12"),
    ({"total_steps": -3}, "total_steps must be a positive integer"),
    ({"tinit": 5, "tfinal": 5}, "tinit \\+ tfinal"),
    ({"tinit": -1}, "tinit must be a non-negative integer"),
    ({"delta_t": 2.5}, "delta_t must be a positive integer"),
    ({"beta1": 1.0}, "beta1 must be in"),
    ({"beta2": float("nan")}, "beta2 must be in"),
    ({"orth_reg_weight": float("inf")}, "orth_reg_weight must be a finite number"),
    ({"adapter": "nope"}, "adapter 'nope' has no AdaLoRA layers"),
])
def test_bad_allocator_arguments_are_named(kwargs, message):
    model = _ada()
    args = {"target_rank": 2, "total_steps": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        lorakit.AdaLoraAllocator(model, **args)
    plain = MLP()
    lorakit.add_lora(plain, lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="AdaLoraConfig"):
        lorakit.AdaLoraAllocator(plain, target_rank=1, total_steps=10)
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=10)
    with pytest.raises(ValueError, match="global_step must be a positive integer"):
        alloc.step(0)


def test_allocator_state_dict_resumes_exactly():
    def run(split: int | None):
        model = _ada(seed=3)
        alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=12, tinit=2, tfinal=3, delta_t=2)
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for t in range(1, 13):
            if t == split:  # a fresh allocator picks up the saved state
                alloc2 = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=12, tinit=2, tfinal=3,
                                                  delta_t=2)
                alloc2.load_state_dict(alloc.state_dict())
                alloc = alloc2
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
            (nn.functional.cross_entropy(model(x), y) + alloc.regularization()).backward()
            opt.step()
            alloc.step()
            opt.zero_grad()
        return model(_x())
    torch.testing.assert_close(run(None), run(7), atol=0, rtol=0)


def test_a_bad_allocator_state_is_refused_and_changes_nothing():
    model = _ada()
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=10)
    _train(model, alloc, 3)
    good = alloc.state_dict()
    before = {k: v.clone() for k, v in good["tensors"].items()}
    for tensors, message in (({**good["tensors"], "ipt/fc1/A": torch.zeros(2, 2)}, "shape \\(2, 2\\), expected \\(6, 12\\)"),
                             ({**good["tensors"], "mask/fc9": torch.ones(6)}, "names a layer"),
                             ({**good["tensors"], "ipt/fc1/Z": torch.ones(6)}, "unknown key")):
        with pytest.raises(ValueError, match=message):
            alloc.load_state_dict({**good, "tensors": tensors})
    with pytest.raises(ValueError, match="needs last_step"):
        alloc.load_state_dict({"tensors": {}})
    after = alloc.state_dict()
    assert after["last_step"] == 3 and all(torch.equal(after["tensors"][k], v) for k, v in before.items())


# ----- export as plain LoRA -------------------------------------------------------------------------------
def _trained(seed: int = 0) -> tuple[nn.Module, lorakit.AdaLoraAllocator]:
    model = _ada(seed=seed, r=6, bias="lora_only")
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=16, tinit=2, tfinal=4, delta_t=2)
    _train(model, alloc, 16)
    return model, alloc


def test_save_writes_the_equivalent_plain_lora_with_rank_pattern(tmp_path):
    model, alloc = _trained()
    pattern = {p: max(n, 1) for p, n in alloc.rank_pattern().items()}  # a layer pruned to 0 is saved as rank 1
    assert sum(alloc.rank_pattern().values()) == 4
    lorakit.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == pattern
    fresh = MLP()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if "adapters" not in k})
    lorakit.load_adapter(fresh, tmp_path)
    x = _x(7)
    torch.testing.assert_close(fresh(x), model(x), atol=ATOL, rtol=ATOL)
    assert [type(m.adapters["default"]).__name__ for m in fresh.modules() if hasattr(m, "adapters")] == \
        ["Adapter"] * len(pattern)


def test_exported_adalora_loads_in_peft_as_ordinary_lora_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model, alloc = _trained(seed=1)
    with torch.no_grad():  # prune one layer entirely: saved as a zero update of rank 1 (PEFT has no rank 0)
        model.fc2.adapters["default"].lora_E.zero_()
    lorakit.save_adapter(model, tmp_path)
    base = MLP()
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                          if "adapters" not in k})
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert peft_model.peft_config["default"].peft_type == peft.PeftType.LORA
    fc2_A = peft.get_peft_model_state_dict(peft_model)["base_model.model.fc2.lora_A.weight"]
    assert fc2_A.shape == (1, 24) and not fc2_A.any()
    x = _x(6)
    torch.testing.assert_close(peft_model(x), model(x), atol=ATOL, rtol=ATOL)


def test_a_layer_pruned_to_rank_0_keeps_its_trained_bias_in_the_checkpoint(tmp_path):
    model = _ada(bias="lora_only")  # Λ = 0 everywhere: every layer has rank 0
    with torch.no_grad():
        model.fc2.base_layer.bias.add_(1.0)  # as training would have moved it
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["rank_pattern"] == {"fc1": 1, "fc2": 1}
    fresh = MLP()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in _ada().state_dict().items()
                           if "adapters" not in k})
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(_x()), model(_x()), atol=ATOL, rtol=ATOL)


def _peft_adalora(tmp_path, prune_all_of: str | None = None):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=3, target_modules=["fc1", "fc2"], total_step=10)
    model = peft.get_peft_model(MLP(), cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
                if "lora_E" in name:
                    p[1] = 0  # a pruned triplet
                    if prune_all_of and prune_all_of in name:
                        p.zero_()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("prune_all_of", [None, "fc2"])
def test_peft_adalora_checkpoint_loads_as_plain_lora_with_equal_outputs(tmp_path, prune_all_of):
    peft_model = _peft_adalora(tmp_path, prune_all_of)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peft_type"] == "ADALORA"
    base = MLP()
    base.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                          for k, v in peft_model.state_dict().items() if "lora_" not in k and "ranknum" not in k})
    lorakit.load_adapter(base, tmp_path)
    x = _x(4)
    torch.testing.assert_close(base(x), peft_model(x), atol=ATOL, rtol=ATOL)
    ranks = {p: m.adapters["default"].rank for p, m in base.named_modules() if hasattr(m, "adapters")}
    assert ranks == {"fc1": 3, "fc2": 1 if prune_all_of else 3}
    from lorakit.cli.inspect import describe  # lorakit inspect reads it the same way

    assert {la["module"]: la["rank"] for la in describe(tmp_path)["layers"]} == ranks


def test_peft_adalora_checkpoint_with_missing_tensor_is_refused(tmp_path):
    _peft_adalora(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("fc1.lora_B"))]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = MLP()
    with pytest.raises(CheckpointError, match="AdaLoRA checkpoint lacks base_model.model.fc1.lora_B"):
        lorakit.load_adapter(model, tmp_path)
    assert lorakit.adapter_names(model) == []


# ----- meeting the rest of lorakit -----------------------------------------------------------------------
def test_merge_unmerge_unload_are_exact():
    model, _ = _trained()
    x = _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    lorakit.merge(model)
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=ATOL)
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():  # unmerge restores W0 (to fp32 rounding)
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, SVDAdapter) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=ATOL)


def test_adalora_and_plain_lora_live_side_by_side_switch_and_run_per_row(tmp_path):
    model = _ada(name="ada")
    _randomize(model, "ada")
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, target_modules=["fc2"]), "plain")
    for a in (model.fc2.adapters["plain"],):
        with torch.no_grad():
            a.lora_B.weight.normal_()
    x = _x(4)
    with lorakit.use_adapter(model, "ada"):
        y_ada = model(x)
    y_plain = model(x)  # "plain" is active
    with lorakit.disabled(model):
        y_base = model(x)
    assert not torch.allclose(y_ada, y_plain) and not torch.allclose(y_ada, y_base)
    with lorakit.per_row_adapters(model, ["ada", "plain", None, "ada"]):
        rows = model(x)
    torch.testing.assert_close(rows, torch.stack([y_ada[0], y_plain[1], y_base[2], y_ada[3]]), atol=ATOL, rtol=ATOL)
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=5, adapter="ada")
    assert set(alloc.adapters) == {"fc1", "fc2"}  # only "ada"'s layers
    lorakit.save_adapter(model, tmp_path, adapter="ada")
    lorakit.delete_adapter(model, "ada")
    lorakit.load_adapter(model, tmp_path / "ada", adapter="ada")
    with lorakit.use_adapter(model, "ada"):
        torch.testing.assert_close(model(x), y_ada, atol=ATOL, rtol=ATOL)


def test_adalora_adapter_refuses_a_plain_pair():
    model = _ada()
    with pytest.raises(NotImplementedError, match="cannot be set from a plain"):
        model.fc1.adapters["default"].load_pair(torch.zeros(2, 12), torch.zeros(24, 2))
