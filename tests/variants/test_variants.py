"""Variants and initialisers: DoRA, PiSSA / OLoRA, plain-LoRA conversion, LoRA+ groups.

Each formula is checked against a plain-torch reference on small tensors, and PEFT 0.21.2 reads what
lorakit writes and the reverse, with equal outputs. Tolerances: fp32 throughout; the references differ
from lorakit only by summation order (and DoRA's factored row norm), well under 1e-5 at these sizes.
"""

import copy
import json
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.checkpoint import CONFIG_NAME
from lorakit.core.layers import LoraLayer, changed_base
from lorakit.variants.dora import DoraAdapter
from tests.conftest import CASES, build, gpt2, randomize_lora

ATOL = 1e-5
DORA_CASES = [c for c in CASES if c.name != "gpt2-slices"]


def _randomize(model, seed=0):
    """Random A, B and (DoRA) magnitudes, so every part of the update is visible."""
    randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DoraAdapter):
                m.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(m.lora_magnitude_vector.shape, generator=g))


def _peft_config(case, **kw):
    from peft import LoraConfig as PeftLoraConfig

    cfg = {k: v for k, v in case.config.items() if k in ("target_modules", "modules_to_save")}
    return PeftLoraConfig(r=4, lora_alpha=8, fan_in_fan_out=case.name == "gpt2", **cfg, **kw)


# ----- DoRA ----------------------------------------------------------------------------------------------
def test_dora_linear_matches_reference_formula_and_gradients():
    torch.manual_seed(0)
    model = lorakit.add_lora(nn.Sequential(nn.Linear(6, 5)), lorakit.LoraConfig(r=2, alpha=3, use_dora=True,
                                                                               target_modules=["0"]))
    _randomize(model)
    layer, x = model[0], torch.randn(4, 6)
    ad = layer.adapters["default"]
    W0, b, A, B, m = layer.base_layer.weight, layer.base_layer.bias, ad.lora_A.weight, ad.lora_B.weight, \
        ad.lora_magnitude_vector
    s = 3 / 2
    # reference, written out: V = W0 + s·B·A; y = m / ||V||_row (detached) * V x + b
    A_r, B_r, m_r = (t.detach().clone().requires_grad_() for t in (A, B, m))
    V = W0 + s * B_r @ A_r
    expected = (m_r / V.norm(dim=1).detach())[:, None] * V @ x.T
    expected = expected.T + b
    out = model(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    for got, ref in ((A, A_r), (B, B_r), (m, m_r)):
        torch.testing.assert_close(got.grad, ref.grad, atol=ATOL, rtol=1e-5)


def test_fresh_dora_adapter_leaves_output_unchanged():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(1, 3, 3))
    x, image = torch.randn(2, 8), torch.randn(2, 1, 6, 6)
    before, before_conv = base[0](x), base[1](image)
    model = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=2, use_dora=True, target_modules=["0", "1"]))
    torch.testing.assert_close(model[0](x), before, atol=1e-6, rtol=0)  # m = ||W0|| at the start
    torch.testing.assert_close(model[1](image), before_conv, atol=1e-6, rtol=0)  # the convolution too


@pytest.mark.parametrize("case", DORA_CASES, ids=[c.name for c in DORA_CASES])
def test_dora_merge_unmerge_exact(case):
    model = build(case, use_dora=True)
    _randomize(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    inputs = case.inputs(3)
    expected = case.run(model, inputs)
    lorakit.merge(model)
    torch.testing.assert_close(case.run(model, inputs), expected, atol=ATOL, rtol=1e-5)
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():
        if k in base:  # unmerge divides by m/||V|| and subtracts s·B·A: fp32 rounding only
            torch.testing.assert_close(v, base[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(case.run(model, inputs), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", DORA_CASES, ids=[c.name for c in DORA_CASES])
def test_dora_peft_interop_both_ways(case, tmp_path):
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = case.build()
    inputs = case.inputs(2)
    # PEFT -> lorakit
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(case, use_dora=True))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert any(isinstance(m, DoraAdapter) for m in ours.modules())
    torch.testing.assert_close(case.run(ours, inputs), case.run(peft_model, inputs), atol=ATOL, rtol=1e-5)
    # lorakit -> PEFT
    model = build(case, use_dora=True)
    _randomize(model, seed=3)
    lorakit.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["use_dora"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(case.run(loaded, inputs), case.run(model, inputs), atol=ATOL, rtol=1e-5)


def test_dora_dropout_in_training_matches_peft():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 7))
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=3, lora_alpha=6, lora_dropout=0.5,
                                                                    target_modules=["0"], use_dora=True))
    ours = copy.deepcopy(base)
    lorakit.add_lora(ours, lorakit.LoraConfig(r=3, alpha=6, dropout=0.5, target_modules=["0"], use_dora=True))
    with torch.no_grad():  # same random weights in both
        ad, pl = ours[0].adapters["default"], peft_model.base_model.model[0]
        for mine, theirs in ((ad.lora_A.weight, pl.lora_A["default"].weight),
                             (ad.lora_B.weight, pl.lora_B["default"].weight),
                             (ad.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight)):
            theirs.add_(torch.randn_like(theirs) * 0.3)
            mine.copy_(theirs)
    x = torch.randn(5, 10)
    ours.train(), peft_model.train()
    torch.manual_seed(7)
    expected = peft_model(x)
    torch.manual_seed(7)  # one dropout draw each: the base term runs on the dropped input, as in PEFT
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=1e-5)


def test_dora_norm_computed_once_while_weights_unchanged_and_never_stale(monkeypatch):
    """Inference forwards compute the row norms ||W0 + s·B·A|| once per layer while the base weight, A and B
    keep their version; any in-place write (an optimizer step, ``copy_``) or a replaced weight recomputes them,
    and forwards with grad compute them every time. PEFT (which computes them on every forward) is the
    reference after each change."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 4))
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                                                                    use_dora=True)).eval()
    ours = copy.deepcopy(base)
    lorakit.add_lora(ours, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0", "2"], use_dora=True))
    pairs = []  # (our tensor, PEFT's) for the base weights, A, B and magnitudes
    for i in (0, 2):
        ad, pl = ours[i].adapters["default"], peft_model.base_model.model[i]
        pairs += [(ours[i].base_layer.weight, pl.base_layer.weight), (ad.lora_A.weight, pl.lora_A["default"].weight),
                  (ad.lora_B.weight, pl.lora_B["default"].weight),
                  (ad.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight)]
    with torch.no_grad():
        for mine, theirs in pairs:
            theirs.add_(torch.randn_like(theirs) * 0.3)
            mine.copy_(theirs)
    calls = []
    row_norm = DoraAdapter.row_norm
    monkeypatch.setattr(DoraAdapter, "row_norm", lambda self, W: calls.append(self) or row_norm(self, W))
    x = torch.randn(5, 10)
    with torch.no_grad(), lorakit.use_adapter(ours, "default"):
        expected = peft_model(x)
        for _ in range(3):
            torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=1e-5)
        assert len(calls) == 2  # one per layer, on the first forward only
        for k in (2, 4):  # our B of the first layer, then the base weight of the second, changed in place
            delta = torch.randn_like(pairs[k][0]) * 0.1
            pairs[k][0].add_(delta), pairs[k][1].add_(delta)
            torch.testing.assert_close(ours(x), peft_model(x), atol=ATOL, rtol=1e-5)
        assert len(calls) == 4  # the changed layer once each time
    ours[0].adapters["default"].lora_A.weight = nn.Parameter(pairs[1][1].detach().clone() * 2)  # a new tensor
    with torch.no_grad():
        pairs[1][1].mul_(2)
        torch.testing.assert_close(ours(x), peft_model(x), atol=ATOL, rtol=1e-5)
    assert len(calls) == 5
    with torch.inference_mode():  # weights made here keep no version counter: computed every time, still right
        fresh = copy.deepcopy(ours)
        assert fresh[0].adapters["default"].lora_B.weight.is_inference()
        for _ in range(2):
            torch.testing.assert_close(fresh(x), peft_model(x), atol=ATOL, rtol=1e-5)
    assert len(calls) == 5 + 4
    torch.testing.assert_close(ours(x), peft_model(x), atol=ATOL, rtol=1e-5)  # with grad (training): every forward
    assert len(calls) == 9 + 2


def test_dora_and_plain_side_by_side_and_what_dora_refuses():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    model = copy.deepcopy(base)
    for name, dora in (("plain", False), ("dora", True)):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, use_dora=dora, target_modules=["0", "2"]), adapter=name)
    _randomize(model, seed=5)
    alone = {}  # each adapter on a model that holds it alone
    for name, other in (("plain", "dora"), ("dora", "plain")):
        single = copy.deepcopy(model)
        lorakit.delete_adapter(single, other)
        lorakit.set_adapter(single, name)
        alone[name] = single(x)
    for name in ("plain", "dora", "plain"):
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(model(x), alone[name], atol=ATOL, rtol=1e-5)
    lorakit.set_adapter(model, "dora")
    lorakit.merge(model)
    torch.testing.assert_close(model(x), alone["dora"], atol=ATOL, rtol=1e-5)
    lorakit.unmerge(model)
    with torch.no_grad(), lorakit.per_row_adapters(model, ["plain", "dora", None]):  # DoRA rows run per row
        out = model(x)
    assert all(layer.row_plan is None for layer in model.modules() if isinstance(layer, LoraLayer))
    torch.testing.assert_close(out[0], alone["plain"][0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out[1], alone["dora"][1], atol=ATOL, rtol=1e-5)
    with lorakit.disabled(model):
        torch.testing.assert_close(out[2], model(x)[2], atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="only plain LoRA adapters combine"):
        lorakit.combine_adapters(model, {"plain": 1.0, "dora": 1.0}, "mix")
    assert "mix" not in lorakit.adapter_names(model)
    with pytest.raises(ValueError, match="DoRA is not supported on fused slices"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, use_dora=True, target_modules=["0"],
                                                   slices={"0": [True, False]}), adapter="x")
    lorakit.delete_adapter(model, "dora")
    assert lorakit.adapter_names(model) == ["plain"]


# ----- PiSSA / OLoRA ---------------------------------------------------------------------------------------
def _decaying(d=12, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    S = torch.tensor([2.0 ** -i for i in range(min(d, k))])
    return U[:, : len(S)] * S @ V[: len(S)]


def _linear_net(W, bias=True):
    net = nn.Sequential(nn.Linear(W.shape[1], W.shape[0], bias=bias))
    with torch.no_grad():
        net[0].weight.copy_(W)
    return net


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_6", "olora"])
def test_base_replacing_inits_keep_output_and_match_formula(init):
    W = _decaying()
    model = _linear_net(W)
    x = torch.randn(4, 10)
    before = model(x)
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, alpha=6, init=init, target_modules=["0"]))
    layer = model[0]
    ad = layer.adapters["default"]
    A, B, s = ad.lora_A.weight, ad.lora_B.weight, 2.0
    torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)  # residual + s·B·A == W0
    torch.testing.assert_close(layer.base_layer.weight + s * B @ A, W, atol=1e-6, rtol=0)
    if init.startswith("pissa"):  # s·B·A is the best rank-3 approximation of W0 (Eckart-Young)
        U, S, Vh = torch.linalg.svd(W)
        atol = 1e-6 if init == "pissa" else 1e-4  # randomized SVD, 6 subspace iterations, gap 2x per value
        torch.testing.assert_close(s * B @ A, U[:, :3] * S[:3] @ Vh[:3], atol=atol, rtol=0)
        # sqrt(S/s) on both sides: B^T B == A A^T == diag(S_r / s)
        for gram in (B.T @ B, A @ A.T):
            torch.testing.assert_close(gram, torch.diag(S[:3] / s), atol=10 * atol, rtol=0)
    else:  # OLoRA: B = Q_r (orthonormal columns), A = R_r (upper triangular)
        torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-6, rtol=0)
        assert torch.count_nonzero(torch.tril(A[:, :3], diagonal=-1)) == 0


def test_convert_to_lora_is_exact_on_the_untouched_base_in_lorakit_and_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    x = torch.randn(5, 10)
    for rslora in (False, True):
        model = copy.deepcopy(base)
        lorakit.add_lora(model, lorakit.LoraConfig(r=3, alpha=6, init="pissa", use_rslora=rslora,
                                                   target_modules=["0", "2"]))
        randomize_lora(model, seed=2)  # "trained": A and B moved away from their start
        expected = model(x)
        out = lorakit.save_adapter(model, tmp_path / str(rslora), convert_to_lora=True)
        cfg = json.loads((out / CONFIG_NAME).read_text())
        assert (cfg["r"], cfg["init_lora_weights"]) == (6, True)
        assert cfg["lora_alpha"] == pytest.approx(6 * (math.sqrt(2) if rslora else 2))
        plain = copy.deepcopy(base)  # the original base, never replaced
        lorakit.load_adapter(plain, out)
        assert not any(changed_base(a) for m in plain.modules() if isinstance(m, LoraLayer)
                       for a in m.adapters.values())
        torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        torch.testing.assert_close(peft_model(x), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_base_replacing_adapter_interop_with_peft(init, tmp_path):
    """PEFT reruns the init on the base when it loads such an adapter; lorakit does the same."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    x = torch.randn(5, 10)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=3, lora_alpha=6, init_lora_weights=init,
                                                                    target_modules=["0", "2"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(ours(x), peft_model(x), atol=ATOL, rtol=1e-5)
    model = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=3, alpha=6, init=init,
                                                                     target_modules=["0", "2"]))
    randomize_lora(model, seed=4)
    lorakit.save_adapter(model, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=1e-5)


def test_base_replacing_adapter_is_exclusive_and_gives_the_base_back():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    x = torch.randn(5, 10)
    base_out = base(x)
    model = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=3, init="olora", target_modules=["0"]))
    randomize_lora(model, seed=1)
    tuned = model(x)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="replaced the base weights .*only it can run"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["2"]), adapter="other")
    for refused in (lambda: lorakit.disabled(model).__enter__(), lambda: lorakit.set_adapter(model, None),
                    lambda: lorakit.per_row_adapters(model, ["default", None, "default", "default", "default"])
                    .__enter__(), lambda: lorakit.combine_adapters(model, {"default": 1.0}, "c")):
        with pytest.raises(ValueError, match="only it can run"):
            refused()
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert lorakit.adapter_names(model) == ["default"] and not model[0].disabled
    with lorakit.per_row_adapters(model, ["default"] * 5):  # its own rows only: allowed
        torch.testing.assert_close(model(x), tuned, atol=ATOL, rtol=1e-5)
    plain = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="add it to a model without adapters"):
        lorakit.add_lora(plain, lorakit.LoraConfig(r=2, init="pissa", target_modules=["2"]), adapter="p")
    assert lorakit.adapter_names(plain) == ["default"]
    merged = lorakit.unload(copy.deepcopy(model), merge=True)  # residual + s·B·A, no lorakit left
    torch.testing.assert_close(merged(x), tuned, atol=ATOL, rtol=1e-5)
    back = lorakit.unload(copy.deepcopy(model), merge=False)
    torch.testing.assert_close(back[0].weight, base[0].weight, atol=1e-6, rtol=0)
    lorakit.delete_adapter(model, "default")
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), base_out, atol=ATOL, rtol=0)


def test_init_names_bad_values_and_peft_config_round_trip():
    assert lorakit.LoraConfig.from_peft_dict({"init_lora_weights": True}).init == "kaiming"
    for bad, match in ((True, "init must be"), (False, "init must be"), ("pissa_niter_0", "must be 1..1000"), ("pissa_niter_5000", "must be 1..1000"), ("pissa_niter_x", "init must be"),
                       ("eva", "not supported by lorakit"), ("olora_3", "init must be"), (None, "init must be"),
                       ("", "init must be")):
        with pytest.raises(ValueError, match=match):
            lorakit.LoraConfig(init=bad)
    with pytest.raises(ValueError, match="use_dora must be"):
        lorakit.LoraConfig(use_dora="yes")
    cfg = lorakit.LoraConfig(r=4, init="pissa_niter_4", use_dora=True, target_modules=["q"])
    d = cfg.to_peft_dict()
    assert (d["init_lora_weights"], d["use_dora"]) == ("pissa_niter_4", True)
    back = lorakit.LoraConfig.from_peft_dict(d)
    assert (back.init, back.use_dora) == ("pissa_niter_4", True)
    with pytest.raises(ValueError, match="init_lora_weights='eva' is not supported"):
        lorakit.LoraConfig.from_peft_dict({**d, "init_lora_weights": "eva"})
    with pytest.raises(ValueError, match="rank 20 exceeds"):
        lorakit.add_lora(nn.Sequential(nn.Linear(10, 12)), lorakit.LoraConfig(r=20, init="pissa",
                                                                               target_modules=["0"]))
    with pytest.raises(ValueError, match="works on linear layers .*not on Embedding"):
        lorakit.add_lora(nn.Sequential(nn.Embedding(10, 4)), lorakit.LoraConfig(r=2, init="olora",
                                                                                target_modules=["0"]))


# ----- LoRA+ ---------------------------------------------------------------------------------------------
def test_loraplus_param_groups():
    model = lorakit.add_lora(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)),
                             lorakit.LoraConfig(r=2, use_dora=True, target_modules=["0"], modules_to_save=["1"]))
    groups = lorakit.loraplus_param_groups(model, lr=1e-3, ratio=16)
    ad = model[0].adapters["default"]
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(16e-3)]
    assert [id(p) for p in groups[1]["params"]] == [id(ad.lora_B.weight)]
    assert {id(p) for p in groups[0]["params"]} == {id(ad.lora_A.weight), id(ad.lora_magnitude_vector),
                                                    *(id(p) for p in model[1].copies["default"].parameters())}
    assert len(lorakit.loraplus_param_groups(model, 1e-3, None)) == 1
    for lr, ratio in ((0, 2), (float("nan"), 2), (1e-3, -1), (1e-3, float("inf")), (1e-3, True), ("1", 2)):
        with pytest.raises(ValueError, match="must be a positive finite number"):
            lorakit.loraplus_param_groups(model, lr, ratio)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lorakit.loraplus_param_groups(nn.Linear(2, 2).requires_grad_(False), 1e-3, 2)


def test_pissa_on_gpt2_conv1d_converts_exactly(tmp_path):
    """Conv1D stores its weight (in, out): the init and the conversion work on the (out, in) form."""
    torch.manual_seed(0)
    base = gpt2()
    ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    model = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, init="pissa_niter_2",
                                                                     target_modules=["c_attn", "c_proj"]))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=ATOL, rtol=1e-5)
    randomize_lora(model, seed=1, std=0.05)
    plain = copy.deepcopy(base)
    lorakit.load_adapter(plain, lorakit.save_adapter(model, tmp_path, convert_to_lora=True))
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=ATOL, rtol=1e-5)


def test_dora_on_a_base_replacing_init_starts_unchanged_and_refuses_conversion(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12))
    x = torch.randn(3, 10)
    model = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=3, init="olora", use_dora=True,
                                                                     target_modules=["0"]))
    torch.testing.assert_close(model(x), base(x), atol=ATOL, rtol=0)  # m = ||residual + s·B·A|| = ||W0||
    with pytest.raises(ValueError, match="DoraAdapter is not a plain LoRA update"):
        lorakit.save_adapter(model, tmp_path / "c", convert_to_lora=True)
    assert not (tmp_path / "c").exists()


def test_module_apply_still_walks_models_with_adapters():
    """nn.Module.apply(fn) (transformers' init_weights uses it) reaches every adapter module."""
    model = lorakit.add_lora(nn.Sequential(nn.Linear(4, 4)), lorakit.LoraConfig(r=2, use_dora=True,
                                                                              target_modules=["0"]))
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert seen.count("DoraAdapter") == 1 and seen.count("Linear") == 3  # base, lora_A, lora_B


def test_dora_on_zero_rows_stays_finite():
    """A zero base row has no direction (PEFT gives 0/0 = nan there): lorakit runs it as plain LoRA."""
    model = lorakit.add_lora(nn.Sequential(nn.Linear(4, 3)), lorakit.LoraConfig(r=2, use_dora=True,
                                                                              target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight[1] = 0  # zero row, B = 0: ||W0 + s·B·A|| = 0 there
    x = torch.randn(5, 4)
    out = model(x)
    out.sum().backward()
    ad = layer.adapters["default"]
    assert torch.isfinite(out).all() and torch.isfinite(ad.lora_magnitude_vector.grad).all()
    lorakit.merge(model, safe=True)  # finite, so safe merge goes through
    torch.testing.assert_close(model(x), out, atol=ATOL, rtol=1e-5)
