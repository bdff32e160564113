"""LoRA on parameters and MoE experts (``target_parameters``, lorakit.variants.params).

Reference: the expert module's own forward run with ``W[e] + s·B[e]·A[e]`` written into its weights (what
PEFT computes). Tolerances: fp32 results that differ only by summation order agree to 1e-5 at these sizes;
gradients (sums over tokens in another order) to 1e-4 relative.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lorakit
from lorakit.cli.inspect import describe
from lorakit.cli.main import main
from lorakit.core.checkpoint import CheckpointError
from lorakit.ops.pool import AdapterPool
from lorakit.variants.params import ParamLayer, routed_forward
from tests.conftest import train_losses
from tests.variants.moe_models import EXPERTS, tiny_moe, token_ids

FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _randomize(model, adapter="default", seed=2, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ParamLayer) and adapter in m.adapters:
                for p in m.adapters[adapter].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def _adapted(arch="qwen3_moe", adapter="default", seed=2, std=0.3, **kw):
    model = tiny_moe(arch)
    cfg = {"r": 2, "alpha": 4, "target_parameters": EXPERTS, **kw}
    lorakit.add_lora(model, lorakit.LoraConfig(**cfg), adapter)
    _randomize(model, adapter, seed, std)
    return model


def _reference(arch, model, adapter="default"):
    """A fresh base model with every adapted expert weight replaced by ``W + ΔW`` (dense, per expert)."""
    ref = tiny_moe(arch)
    with torch.no_grad():
        for path, m in model.named_modules():
            if isinstance(m, ParamLayer):
                for name, part in m.adapters[adapter].parts.items():
                    A, B = part.factors()  # (E, r, k), (E, d, r)
                    delta = torch.stack([B[e] @ A[e] for e in range(A.shape[0])]) * part.scaling
                    if part.transposed:
                        delta = delta.transpose(1, 2)
                    weight = getattr(ref.get_submodule(path), name)
                    weight.add_(delta.view(weight.shape))  # a 2-D parameter is one "expert"
    return ref


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_forward_equals_dense_reference_and_new_adapter_is_identity(arch):
    x = token_ids()
    base = tiny_moe(arch)(x).logits
    model = tiny_moe(arch)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_parameters=EXPERTS))
    # B starts at zero; the routed path runs the experts itself (another kernel than grouped_mm): fp32 rounding
    torch.testing.assert_close(model(x).logits, base, **FP32)
    _randomize(model)
    out = model(x).logits
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, _reference(arch, model)(x).logits, **FP32)


def test_routed_path_equals_generic_path_outputs_and_gradients(monkeypatch):
    x = token_ids()
    model = _adapted()
    model(x).logits.square().mean().backward()
    routed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out = model(x).logits
    model.zero_grad()
    calls = []
    monkeypatch.setattr("lorakit.variants.params._routing_args", lambda *a: calls.append(1))  # -> None: generic
    model(x).logits.square().mean().backward()
    generic = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 1  # the one MoE layer went the generic way (W + ΔW through torch.func.functional_call)
    torch.testing.assert_close(model(x).logits, out, **FP32)
    assert routed.keys() == generic.keys() and len(routed) == 4  # 2 parameters x (A, B)
    for n in routed:
        torch.testing.assert_close(routed[n], generic[n], atol=1e-6, rtol=1e-4)


def test_grouped_factors_kept_for_inference_and_never_stale():
    """The grouped-matmul layout of A and B is kept between inference forwards and rebuilt after an in-place
    change of the factors; with grad it is built every time. The dense reference is read afresh each time."""
    x = token_ids()
    model = _adapted()
    part = model.model.layers[0].mlp.experts.adapters["default"].parts["down_proj"]
    with torch.no_grad():
        assert part.grouped_factors()[1] is part.grouped_factors()[1]
        before = model(x).logits
        torch.testing.assert_close(before, _reference("qwen3_moe", model)(x).logits, **FP32)
        part.lora_B.weight.mul_(2)
        after = model(x).logits
        torch.testing.assert_close(after, _reference("qwen3_moe", model)(x).logits, **FP32)
    assert (after - before).abs().max() > 1e-2
    assert part.grouped_factors()[1] is not part.grouped_factors()[1]  # grad enabled: built per call


def test_routed_forward_with_no_tokens():
    layer = _adapted().model.layers[0].mlp.experts
    out = routed_forward(layer.base_layer, torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long),
                         torch.zeros(0, 2), dict(layer.adapters["default"].parts))
    assert out.shape == (0, 32)


def test_merge_unmerge_unload():
    x = token_ids()
    model = _adapted()
    originals = {n: p.clone() for n, p in model.named_parameters() if "experts.base_layer" in n}
    out = model(x).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(x).logits, out, **FP32)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in originals:  # W + ΔW - ΔW in fp32: within a few ulps of |W| (~0.5 here)
            torch.testing.assert_close(p, originals[n], atol=1e-6, rtol=0)
    base = lorakit.unload(_adapted(), merge=False)
    assert type(base.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(base(x).logits, tiny_moe("qwen3_moe")(x).logits, atol=1e-6, rtol=0)
    merged = lorakit.unload(_adapted(), merge=True)
    assert not any(isinstance(m, ParamLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, out, **FP32)


def test_disabled_is_the_base_model_bit_for_bit():
    x = token_ids()
    model = _adapted()
    with lorakit.disabled(model):
        assert torch.equal(model(x).logits, tiny_moe("qwen3_moe")(x).logits)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "adapters" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "adapters" in n)


def test_several_adapters_switch_and_must_target_the_same_parameters():
    x = token_ids()
    model = _adapted(seed=2)
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, target_parameters=EXPERTS), "b")
    _randomize(model, "b", seed=3)
    out_b = model(x).logits
    lorakit.set_adapter(model, "default")
    torch.testing.assert_close(model(x).logits, _adapted(seed=2)(x).logits, **FP32)
    torch.testing.assert_close(out_b, _reference("qwen3_moe", model, "b")(x).logits, **FP32)
    with pytest.raises(ValueError, match=r"every adapter must target the same parameters"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_parameters=["experts.down_proj"]), "c")
    assert lorakit.adapter_names(model) == ["default", "b"]
    lorakit.delete_adapter(model, "b")
    torch.testing.assert_close(model(x).logits, _adapted(seed=2)(x).logits, **FP32)


def _three_adapters(arch):
    """Experts only (r=2), every linear layer and every expert (r=3), plain LoRA on q and v, DoRA on k and o:
    all random."""
    model = tiny_moe(arch)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS), "e1")
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, alpha=3, target_modules="all-linear", target_parameters="all-experts"),
                     "e2")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "plain")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["k_proj", "o_proj"], use_dora=True), "dora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".parts." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


ROWS = ["e1", None, "plain", "e2", "e1", "dora"]  # expert rows, a base row, plain LoRA and DoRA rows in one batch


def _alone(model, x):
    """Each adapter (None: the base model) run on the whole batch by itself."""
    out = {}
    with torch.no_grad():
        for name in dict.fromkeys(ROWS):
            with lorakit.disabled(model) if name is None else lorakit.use_adapter(model, name):
                out[name] = model(x).logits
    return out


@pytest.mark.parametrize(("arch", "grouped"), [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)])
def test_per_row_expert_rows_equal_each_adapter_alone(arch, grouped, monkeypatch):
    """Each row's tokens, routed to experts, get that row's adapter's expert update (grouped by adapter, then
    expert): per_row_adapters and the pool give every row the output of its adapter alone, for a prefill
    (7 tokens a row) and a decode step (1). fp32: the same products in another grouping, 1e-5."""
    if not grouped:  # the loop over experts, where torch.nn.functional.grouped_mm does not take the operands
        monkeypatch.setattr("lorakit.variants.params._grouped_ok", lambda *t: False)
    model = _three_adapters(arch)
    pool = AdapterPool(model)
    for name in ("e1", "e2", "plain", "dora"):
        pool.add(name)
    for seq in (7, 1):
        x = token_ids(len(ROWS), seq)
        alone = _alone(model, x)
        with torch.no_grad():
            with lorakit.per_row_adapters(model, ROWS):
                rows = model(x).logits
            with pool.rows(ROWS):
                pooled = model(x).logits
        assert all(layer.row_plan is None for layer in model.modules() if isinstance(layer, ParamLayer))
        for i, name in enumerate(ROWS):
            torch.testing.assert_close(rows[i], alone[name][i], **FP32)
            torch.testing.assert_close(pooled[i], alone[name][i], **FP32)
    assert (alone["e1"] - alone[None]).abs().max() > 1e-2 and (alone["e2"] - alone["e1"]).abs().max() > 1e-2


def test_per_row_expert_gradients_equal_the_adapter_alone_on_its_rows():
    """With grad, an expert adapter's factors get the gradient of its own rows: the same as running it alone
    on those rows (1e-4 relative: sums over tokens in another order)."""
    model = _three_adapters("qwen3_moe")
    x = token_ids(len(ROWS), 5)
    parts = model.model.layers[0].mlp.experts.adapters["e1"].parts
    parts.requires_grad_(True)  # only the adapter added last trains after add_lora
    with lorakit.per_row_adapters(model, ROWS):
        model(x).logits.square().sum().backward()
    rows = {n: p.grad.clone() for n, p in parts.named_parameters()}
    model.zero_grad()
    with lorakit.use_adapter(model, "e1"):
        model(x[[0, 4]]).logits.square().sum().backward()
    assert len(rows) == 4 and all(g.abs().max() > 0 for g in rows.values())
    for n, p in parts.named_parameters():
        torch.testing.assert_close(rows[n], p.grad, atol=1e-5, rtol=1e-4)


def test_per_row_expert_rows_must_match_the_batch():
    """The experts see the batch flattened to tokens: the MoE block around them checks the row count (12 tokens
    would split evenly between 2 names), and the context leaves no hook behind."""
    model = _adapted()  # experts only: no linear layer to count the rows
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_parameters=EXPERTS), "b")
    x = token_ids(4, 3)
    pool = AdapterPool(model)
    pool.add("default")
    for context in (lorakit.per_row_adapters(model, ["default", "b"]), pool.rows(["default", None])):
        with pytest.raises(ValueError, match="got 2 adapter names for a batch of 4 rows"), torch.no_grad(), context:
            model(x)
    block = model.model.layers[0].mlp
    assert not block._forward_pre_hooks and model.model.layers[0].mlp.experts.row_plan is None


def test_per_row_refuses_a_two_dimensional_parameter_and_combine_refuses_experts():
    model = _adapted(target_parameters=["mlp.gate.weight"])  # the router: the generic path (W + ΔW), not routed
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_parameters=["mlp.gate.weight"]), "b")
    with pytest.raises(ValueError, match=r"adapter '(default|b)' is a ParamAdapter, which per-row batching does not"):
        with lorakit.per_row_adapters(model, ["default", "b"]):
            pass
    with pytest.raises(ValueError, match=r"AdapterPool: adapter 'default' is a ParamAdapter"):
        AdapterPool(model).add("default")
    experts = _adapted()
    lorakit.add_lora(experts, lorakit.LoraConfig(r=2, target_parameters=EXPERTS), "b")
    with pytest.raises(ValueError, match=r"combine_adapters: adapter 'default' is a ParamAdapter"):
        lorakit.combine_adapters(experts, {"default": 1.0, "b": 1.0}, "ab", how="cat")
    assert lorakit.adapter_names(experts) == ["default", "b"]


def test_save_load_round_trip_and_inspect(tmp_path):
    x = token_ids()
    model = _adapted(target_modules="all-linear", target_parameters="all-experts")
    out = model(x).logits
    path = lorakit.save_adapter(model, tmp_path)
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted(EXPERTS)  # "all-experts" is saved as what it matched
    loaded = tiny_moe("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base fingerprint matches (same model, planned in model order)
        lorakit.load_adapter(loaded, path)
    torch.testing.assert_close(loaded(x).logits, out, atol=0, rtol=0)
    info = describe(path)
    experts = [row for row in info["layers"] if "experts" in row]
    assert len(experts) == 2 and all(row["experts"] == 4 and row["rank"] == 2 for row in experts)
    layer = model.model.layers[0].mlp.experts.adapters["default"].parts["down_proj"]
    row = next(r for r in experts if r["module"] == "model.layers.0.mlp.experts")  # the last parameter: no .base_layer
    torch.testing.assert_close(torch.tensor(row["expert_norms"]), layer.expert_norms(), atol=1e-5, rtol=1e-5)


def test_rank_and_alpha_patterns_by_parameter_path_load_and_inspect(tmp_path, capsys):
    """rank_pattern / alpha_pattern keyed by ``<module>.<parameter>`` (PEFT's keys): the load takes the file and
    inspect reports each parameter's own rank, expert count and scaling (it read ``config.r`` before, and the
    load refused a rank that is no multiple of ``r``)."""
    x = token_ids()
    model = _adapted(r=3, rank_pattern={"experts.down_proj": 2}, alpha_pattern={"experts.down_proj": 8})
    parts = model.model.layers[0].mlp.experts.adapters["default"].parts
    assert (parts["gate_up_proj"].rank, parts["down_proj"].rank) == (3, 2)
    path = lorakit.save_adapter(model, tmp_path)
    loaded = tiny_moe("qwen3_moe")
    lorakit.load_adapter(loaded, path)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    rows = {row["parameter"]: row for row in describe(path)["layers"]}
    assert {p: (rows[p]["rank"], rows[p]["experts"]) for p in parts} == {"gate_up_proj": (3, 4), "down_proj": (2, 4)}
    assert rows["down_proj"]["scaling"] == 4.0 and rows["gate_up_proj"]["scaling"] == 4 / 3
    for name, part in parts.items():
        torch.testing.assert_close(torch.tensor(rows[name]["expert_norms"]), part.expert_norms(), **FP32)
    assert main(["inspect", str(path)]) == 0
    assert "down_proj: 4 experts x rank 2" in capsys.readouterr().out


def test_load_checks_expert_ranks_before_touching_the_model(tmp_path):
    model = _adapted()
    path = lorakit.save_adapter(model, tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))  # a multiple of 2: only the model knows E
    target = tiny_moe("qwen3_moe")
    with pytest.raises(CheckpointError, match=r"experts.base_layer.lora_A.weight has shape \(8, 32\), but adapter_config"
                                              r".json gives 16 rows \(rank x experts\)"):
        lorakit.load_adapter(target, path)
    assert lorakit.adapter_names(target) == []


def test_all_linear_and_all_experts():
    model = tiny_moe("qwen3_moe")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules="all-linear", target_parameters="all-experts"))
    layers = [n for n, m in model.named_modules() if isinstance(m, lorakit.core.layers.LoraLayer)]
    assert len(layers) == 4 + 1  # q, k, v, o and the experts
    only_linear = lorakit.add_lora(tiny_moe("qwen3_moe"), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert not any(isinstance(m, ParamLayer) for m in only_linear.modules())  # all-linear keeps PEFT's meaning


def test_two_dimensional_parameter_uses_the_generic_path():
    x = token_ids()
    model = _adapted(target_parameters=["mlp.gate.weight"])  # the router: a 2-D nn.Parameter, not an nn.Linear
    layer = model.model.layers[0].mlp.gate
    assert isinstance(layer, ParamLayer) and layer.adapters["default"].parts["weight"].num_experts == 1
    torch.testing.assert_close(model(x).logits, _reference("qwen3_moe", model)(x).logits, **FP32)


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="dropout=0.1 cannot be used with target_parameters"):
        lorakit.LoraConfig(target_parameters=EXPERTS, dropout=0.1)
    with pytest.raises(ValueError, match="use_dora cannot be used with target_parameters"):
        lorakit.LoraConfig(target_parameters=EXPERTS, use_dora=True)
    with pytest.raises(ValueError, match="target_parameters must be a non-empty list"):
        lorakit.LoraConfig(target_parameters="experts.*")
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match=r"no parameter matches target_parameters=\['experts.up_proj'\]; 3-D"):
        lorakit.add_lora(model, lorakit.LoraConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match=r"model.norm.weight of shape \(32,\); only 2-D and 3-D"):
        lorakit.add_lora(model, lorakit.LoraConfig(target_parameters=["model.norm.weight"]))
    assert not any(isinstance(m, ParamLayer) for m in model.modules())


def test_peft_config_round_trip():
    cfg = lorakit.LoraConfig(r=4, target_parameters=EXPERTS)
    d = cfg.to_peft_dict()
    assert d["target_modules"] == [] and d["target_parameters"] == EXPERTS  # []: PEFT adds no default modules
    back = lorakit.LoraConfig.from_peft_dict(d)
    assert back.target_modules is None and back.target_parameters == sorted(EXPERTS)


def test_trains_only_expert_factors_and_loss_falls():
    x = token_ids(batch=4)
    model = _adapted(seed=2, std=0.01).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 and all(p.shape[0] in (8, 32) for p in params)
    losses = train_losses(model, steps=5, lr=2e-2, input_ids=x, labels=x)
    assert losses[-1] < losses[0] - 0.05


def test_qlora_base_expert_adapters_beside_quantized_linear_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    x = token_ids()
    model = lorakit.quantize(tiny_moe("qwen3_moe"), bits=4)  # 4-bit q/k/v/o; the 3-D expert stacks stay fp32
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS))
    _randomize(model)
    ref = lorakit.quantize(_reference("qwen3_moe", model), bits=4)  # the same 4-bit layers, W + ΔW in the experts
    torch.testing.assert_close(model(x).logits, ref(x).logits, **FP32)
    both = lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    lorakit.add_lora(model, both, "both")
    _randomize(model, "both", seed=4)
    path = lorakit.save_adapter(model, tmp_path, "both")
    loaded = lorakit.quantize(tiny_moe("qwen3_moe"), bits=4)
    lorakit.load_adapter(loaded, path)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
