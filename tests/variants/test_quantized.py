"""QLoRA: LoRA over bitsandbytes' 4-bit / 8-bit base layers (variants/quantized.py)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.core.checkpoint import CheckpointError, read_adapter
from lorakit.core.layers import LoraLinear
from lorakit.variants.quantized import (
    PRESETS,
    LoraQuantLinear,
    dequantize,
    quantized_linear,
    set_quantized_weight,
    weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")

# fp32 compute on both sides: the quantized layer runs x @ dequant(W).T, so only summation order differs
FP32_TOL = 1e-5


class Tiny(nn.Module):
    """Two blocks of q/v projections and an MLP, plus an output head (never quantized)."""

    def __init__(self, d=64, vocab=32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "v": nn.Linear(d, d, bias=False),
                                                   "mlp": nn.Linear(d, d)}) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["mlp"](torch.tanh(b["q"](x) + b["v"](x)))
        return self.lm_head(x)


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def _randomize_B(model):
    with torch.no_grad():
        for layer in lorakit.core.model.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.weight.normal_(std=0.05)


@pytest.mark.parametrize("bits,quant_type,double_quant", [(4, "nf4", True), (4, "fp4", False), (8, "nf4", False)])
def test_quantize_swaps_linear_layers_but_not_the_head(bits, quant_type, double_quant):
    model = _model()
    fp32_bytes = sum(weight_bytes(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n)
    lorakit.quantize(model, bits=bits, quant_type=quant_type, double_quant=double_quant)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    swapped = [n for n, m in model.named_modules() if isinstance(m, kind)]
    assert len(swapped) == 6 and type(model.lm_head) is nn.Linear
    q_bytes = sum(weight_bytes(model.get_submodule(n)) for n in swapped)
    # 4-bit: 0.125 + absmax constants + code table (the goal: <= 0.3); 8-bit: 0.25 + an fp32 scale per row
    assert q_bytes <= (0.3 if bits == 4 else 0.25 + 1 / 64 + 1e-9) * fp32_bytes
    # the layer computes with dequantize()'s weight: x @ W.T + b
    layer, x = model.blocks[0]["q"], torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ dequantize(layer).T + layer.bias, atol=FP32_TOL if bits == 4 else 0.05)


def test_quantize_validates_everything_before_changing_the_model():
    model = _model()
    for kwargs, message in [({"bits": 3}, "bits must be 4 or 8"), ({"bits": True}, "bits must be 4 or 8"),
                            ({"bits": 4.0}, "bits must be 4 or 8"),
                            ({"quant_type": "int4"}, "quant_type must be one of nf4|fp4"),
                            ({"double_quant": "yes"}, "double_quant must be True or False"),
                            ({"compute_dtype": torch.int8}, "compute_dtype must be a floating"),
                            ({"skip_modules": "q"}, "skip_modules must be a list")]:
        with pytest.raises(ValueError, match=message):
            lorakit.quantize(model, **kwargs)
    with torch.no_grad():
        model.blocks[1]["mlp"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp: weight has non-finite"):
        lorakit.quantize(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # nothing swapped
    with pytest.raises(ValueError, match="no linear layer to quantize"):
        lorakit.quantize(nn.Sequential(nn.ReLU()))
    lorakit.quantize(model, skip_modules=["mlp"])
    assert type(model.blocks[1]["mlp"]) is nn.Linear and isinstance(model.blocks[1]["q"], bnb.nn.Linear4bit)


def test_lora_on_4bit_base_matches_dequantized_reference_outputs_and_gradients():
    model = lorakit.quantize(_model())
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    layer = model.blocks[0]["q"]
    assert type(layer) is LoraQuantLinear and type(model.lm_head) is nn.Linear  # all-linear: head left out
    _randomize_B(model)
    adapter, x = layer.adapters["default"], torch.randn(5, 64, requires_grad=True)
    W = dequantize(layer.base_layer)
    A = adapter.lora_A.weight.detach().clone().requires_grad_(True)
    B = adapter.lora_B.weight.detach().clone().requires_grad_(True)
    ref = x @ W.T + layer.base_layer.bias + (x @ A.T @ B.T) * 2.0
    out = layer(x)
    assert torch.allclose(out, ref, atol=FP32_TOL)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(adapter.lora_A.weight.grad, A.grad, atol=FP32_TOL)
    assert torch.allclose(adapter.lora_B.weight.grad, B.grad, atol=FP32_TOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    full = lorakit.add_lora(_model(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert lorakit.trainable_parameters(model) == lorakit.trainable_parameters(full)  # 4-bit weights count whole


@pytest.mark.parametrize("bits,double_quant", [(4, False), (4, True), (8, False)])
def test_merge_requantizes_and_reports_the_error_unmerge_comes_back(bits, double_quant):
    model = lorakit.quantize(_model(), bits=bits, double_quant=double_quant)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q", "v", "mlp"]))
    model.eval()
    layer, x = model.blocks[0]["q"], torch.randn(4, 64)
    codes, W0 = layer.base_layer.weight.data.clone(), dequantize(layer.base_layer)
    # a zero update (fresh B): requantizing the dequantized weight gives the same codes (double quant: the block
    # constants are themselves rounded again, a few 1e-5 at most)
    lorakit.merge(model)
    if double_quant:
        assert 0 < (dequantize(layer.base_layer) - W0).abs().max() < 1e-4
    else:
        assert torch.equal(layer.base_layer.weight.data, codes)
    lorakit.unmerge(model)
    _randomize_B(model)
    with torch.no_grad():
        unmerged = model(x)
        W, delta = dequantize(layer.base_layer), layer.delta_weight("default")
    lorakit.merge(model)
    errors = lorakit.merge_errors(model)
    assert len(errors) == 6
    # the merged base is exactly bitsandbytes' quantization of W + delta, and the recorded error says how far off
    expected = nn.Linear(64, 64)
    with torch.no_grad():
        expected.weight.copy_(W + delta)
    expected = quantized_linear(expected, bits, "nf4", double_quant, None)
    assert torch.equal(layer.base_layer.weight.data, expected.weight.data)
    err = dequantize(layer.base_layer) - (W + delta)
    assert errors["blocks.0.q"].max_abs == pytest.approx(err.abs().max().item())
    assert errors["blocks.0.q"].relative == pytest.approx((err.norm() / delta.norm()).item(), rel=1e-5)
    with torch.no_grad():
        merged = model(x)
    # six layers' weights rounded again to the 4-bit grid (each weight moves by up to half a code gap, ~6% of
    # its block's absmax) move the output by ~5%; int8's grid is 16x finer
    assert (merged - unmerged).norm() / unmerged.norm() < (0.1 if bits == 4 else 0.01)
    lorakit.unmerge(model)
    restored = dequantize(layer.base_layer)
    # not exact: restored - W = (merge's rounding) + (unmerge's rounding), both recorded
    unmerge_error = lorakit.merge_errors(model)["blocks.0.q"]
    assert 0 < (restored - W).abs().max() <= errors["blocks.0.q"].max_abs + unmerge_error.max_abs + 1e-6
    assert layer.merged == []


def test_add_lora_then_quantize_keeps_adapters_and_their_outputs():
    first = _model()
    lorakit.add_lora(first, lorakit.LoraConfig(r=4, target_modules=["q", "v"]))
    lorakit.add_lora(first, lorakit.LoraConfig(r=2, target_modules=["q"]), adapter="other")
    _randomize_B(first)
    second = lorakit.quantize(_model())
    lorakit.add_lora(second, lorakit.LoraConfig(r=4, target_modules=["q", "v"]))
    lorakit.add_lora(second, lorakit.LoraConfig(r=2, target_modules=["q"]), adapter="other")
    second.load_state_dict({k: v for k, v in first.state_dict().items() if ".adapters." in k}, strict=False)
    trained = {n for n, p in first.named_parameters() if p.requires_grad}
    lorakit.quantize(first)  # the wrapped bases are quantized under their adapters; mlp layers too
    assert {n for n, p in first.named_parameters() if p.requires_grad} == trained
    assert type(first.blocks[0]["q"]) is LoraQuantLinear and isinstance(first.blocks[0]["mlp"], bnb.nn.Linear4bit)
    assert lorakit.adapter_names(first) == ["default", "other"] and lorakit.active_adapter(first) == "other"
    x = torch.randn(3, 64)
    for name in ("default", "other"):
        lorakit.set_adapter(first, name)
        lorakit.set_adapter(second, name)
        assert torch.allclose(first(x), second(x), atol=FP32_TOL)
    with pytest.raises(ValueError, match="no linear layer to quantize"):
        lorakit.quantize(first)  # everything but the head is 4-bit already
    fp = _model()
    lorakit.add_lora(fp, lorakit.LoraConfig(r=4, target_modules=["q"]))
    lorakit.merge(fp)
    with pytest.raises(ValueError, match=r"blocks\.0\.q: adapter \['default'\] is merged; unmerge"):
        lorakit.quantize(fp)
    assert type(fp.blocks[0]["mlp"]) is nn.Linear  # refused before any layer changed


def test_quantize_keeps_trained_biases_training():
    model = lorakit.add_lora(_model(), lorakit.LoraConfig(r=4, target_modules=["q"], bias="lora_only"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.q.base_layer.bias" in trained
    lorakit.quantize(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained


def test_several_adapters_per_row_disabled_on_quantized_base():
    model = lorakit.quantize(_model())
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q", "v"]), adapter="a")
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["q"]), adapter="b")
    _randomize_B(model)
    x = torch.randn(3, 5, 64)
    singles = {}
    for name in ("a", "b"):
        with lorakit.use_adapter(model, name):
            singles[name] = model(x)
    with lorakit.disabled(model):
        base = model(x)
    with lorakit.per_row_adapters(model, ["a", "b", None]):
        rows = model(x)
    assert torch.allclose(rows[0], singles["a"][0], atol=FP32_TOL)
    assert torch.allclose(rows[1], singles["b"][1], atol=FP32_TOL)
    assert torch.allclose(rows[2], base[2], atol=FP32_TOL)
    assert not torch.allclose(singles["a"], base, atol=1e-3)
    lorakit.delete_adapter(model, "a")
    lorakit.delete_adapter(model, "b")
    assert isinstance(model.blocks[0]["q"], bnb.nn.Linear4bit)  # the last adapter gone: the 4-bit layer is back


def test_unload_merge_false_gives_back_the_quantized_layers():
    model = lorakit.quantize(_model(), bits=8)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q"]))
    codes = model.blocks[0]["q"].base_layer.weight.data.clone()
    lorakit.unload(model, merge=False)
    assert type(model.blocks[0]["q"]) is bnb.nn.Linear8bitLt and torch.equal(model.blocks[0]["q"].weight.data, codes)


def test_save_on_quantized_base_load_on_full_precision_and_quantized(tmp_path):
    model = lorakit.quantize(_model())
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q", "v"]))
    _randomize_B(model)
    lorakit.save_adapter(model, tmp_path)
    x = torch.randn(2, 64)
    again = lorakit.quantize(_model())
    lorakit.load_adapter(again, tmp_path)
    assert torch.equal(again(x), model(x))
    full = _model()
    lorakit.load_adapter(full, tmp_path)  # the same keys: the adapter merges into the fp32 base (lorakit merge)
    with torch.no_grad():
        for path in ("blocks.0.q", "blocks.1.v"):
            fp, q = full.get_submodule(path), model.get_submodule(path)
            assert torch.equal(fp.delta_weight("default"), q.delta_weight("default"))
    lorakit.unload(full, merge=True)
    assert type(full.blocks[0]["q"]) is nn.Linear and full.blocks[0]["q"].weight.dtype == torch.float32


@pytest.mark.parametrize("preset", ["nf4", "fp4", "int8", None])
def test_the_checkpoint_records_the_base_quantization(tmp_path, preset):
    model = _model()
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q"]))
    if preset:
        lorakit.quantize(model, **PRESETS[preset])
    lorakit.save_adapter(model, tmp_path)
    assert read_adapter(tmp_path)[1]["lorakit"].get("quantization") == preset  # QLoRA: rebuilt on load
    header = json.loads(safe_open(tmp_path / "adapter_model.safetensors", "pt").metadata()["lorakit"])
    save_file(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.safetensors",
              metadata={"lorakit": json.dumps({**header, "quantization": "nf5"})})
    with pytest.raises(CheckpointError, match="quantization has an invalid value 'nf5'"):
        read_adapter(tmp_path)


def test_set_quantized_weight_keeps_the_layer_settings():
    lin = nn.Linear(128, 32)
    q = quantized_linear(lin, 4, "fp4", False, torch.float32)
    set_quantized_weight(q, torch.randn(32, 128))
    state = q.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("fp4", 64, False)
    assert isinstance(lorakit.core.layers.lora_layer_type(q)(q), LoraQuantLinear)
    assert lorakit.core.layers.lora_layer_type(lin) is LoraLinear


def test_core_imports_without_bitsandbytes_and_quantize_names_the_extra():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, lorakit\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
            "lorakit.add_lora(m, lorakit.LoraConfig(r=2, target_modules=['0']))\n"
            "try:\n    lorakit.quantize(m)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "4/8-bit bases need bitsandbytes: pip install 'lorakit[qlora]'"


def test_training_forward_after_an_inference_forward_has_gradients():
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at an eval-mode no-grad forward, into a layout
    whose kernel has no backward; lorakit's layers never repack, and a LoRA-wrapped layer that was repacked
    (as transformers' loading leaves them) gets the standard layout back when gradients are needed."""
    model = lorakit.quantize(_model())
    wild = quantized_linear(nn.Linear(64, 64), 4, "nf4", True, None)
    wild.support_avx512bf16_for_cpu = bnb.nn.Linear4bit(4, 4).support_avx512bf16_for_cpu  # bitsandbytes' default
    model.blocks[1]["q"] = wild
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q"]))
    x = torch.randn(2, 64)
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    for path in ("blocks.0.mlp", "blocks.1.q"):
        layer = model.get_submodule(path)
        xg = x.clone().requires_grad_(True)
        layer(xg).sum().backward()
        W = dequantize(layer.base_layer if path.endswith("q") else layer)
        assert torch.allclose(xg.grad, W.sum(0).expand_as(xg), atol=FP32_TOL)  # d(sum(x W^T))/dx, B = 0


def test_adapter_gradients_flow_through_unadapted_4bit_layers_after_an_inference_forward():
    """transformers loads every linear layer as bitsandbytes' Linear4bit, which repacks at an eval-mode no-grad
    forward (AVX512-BF16 CPUs) into a layout with no backward: gradients through an unadapted one silently
    vanished. Attaching an adapter puts every 4-bit layer back in the standard layout, for good."""
    x, grads = torch.randn(2, 64), []
    for wild_default in (True, False):  # bitsandbytes' default vs a layer that never repacks (the control)
        model = lorakit.quantize(_model())
        wild = quantized_linear(nn.Linear(64, 64), 4, "nf4", True, None)
        wild.support_avx512bf16_for_cpu = bnb.nn.Linear4bit(4, 4).support_avx512bf16_for_cpu and wild_default
        model.blocks[1]["mlp"] = wild  # not adapted below
        model.eval()
        with torch.no_grad():
            model(x)  # repacks `wild` where bitsandbytes does
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, dropout=0.0, target_modules=["q"]))
        torch.manual_seed(1)
        _randomize_B(model)
        with torch.no_grad():
            model(x)  # an evaluation after the adapter came
        model.train()
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:  # bitsandbytes' repack -> unpack round trip moves weights by up to ~3e-4 (its block
        # constants pass through a coarser type), so the gradients agree to 2e-3; without the standard layout back,
        # the backward through `wild` raises (with a bias) or silently contributes nothing (without one)
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-3, rtol=2e-3, msg=name)


# ----- LoftQ ----------------------------------------------------------------------------------------------------
def _weight_error(model, original, path):
    layer = model.get_submodule(path)
    fit = dequantize(layer.base_layer) + layer.delta_weight("default")
    return (fit - original.get_submodule(path).weight).norm().item()


def test_loftq_fits_quantized_base_plus_adapter_closer_than_plain_qlora():
    original, x = _model(), torch.randn(3, 64)
    targets = lorakit.LoraConfig(r=8, target_modules=["q", "v", "mlp"])
    plain = lorakit.quantize(_model())
    lorakit.add_lora(plain, targets)
    errors = {}
    for init in ("loftq", "loftq_5"):
        model = lorakit.add_lora(_model(), targets.replace(init=init))
        assert type(model.blocks[0]["q"].base_layer) is nn.Linear  # the base is dequant(Q) in fp32 until quantize()
        before = model(x)
        lorakit.quantize(model)  # requantizing dequant(Q): the same codes, block constants drift ~1e-5
        assert isinstance(model.blocks[0]["q"].base_layer, bnb.nn.Linear4bit)
        torch.testing.assert_close(model(x), before, atol=1e-3, rtol=0)
        errors[init] = _weight_error(model, original, "blocks.0.q")
    # ||W - (dequant(Q) + s·B·A)||: plain QLoRA starts at the quantization error (B = 0); LoftQ takes the top-r
    # part of it out (observed 0.42 -> 0.34 -> 0.31 with 1 and 5 iterations)
    assert errors["loftq_5"] < errors["loftq"] < 0.9 * _weight_error(plain, original, "blocks.0.q")


def test_loftq_checkpoint_reruns_on_a_full_precision_base_and_is_refused_where_it_cannot_hold(tmp_path):
    model = lorakit.add_lora(_model(), lorakit.LoraConfig(r=4, target_modules=["q"], init="loftq_2"))
    x = torch.randn(2, 64)
    lorakit.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["init_lora_weights"], saved["loftq_config"]) == ("loftq", {"loftq_bits": 4, "loftq_iter": 2})
    fresh = _model()
    lorakit.load_adapter(fresh, tmp_path / "a")  # LoftQ reruns on the original weights: the same quantized base
    assert torch.equal(fresh(x), model(x))
    quantized = lorakit.quantize(_model())
    with pytest.raises(ValueError, match="init 'loftq' fits the adapter to the full-precision weight, and this base is"):
        lorakit.load_adapter(quantized, tmp_path / "a")
    assert lorakit.adapter_names(quantized) == []
    with pytest.raises(ValueError, match="convert_to_lora: adapter 'default' was initialised by 'loftq_2', whose base is not the original"):
        lorakit.save_adapter(model, tmp_path / "c", convert_to_lora=True)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="loftq_bits=2: lorakit's LoftQ is 4-bit"):
        lorakit.LoraConfig.from_peft_dict({**saved, "loftq_config": {"loftq_bits": 2, "loftq_iter": 1}})
    with pytest.raises(ValueError, match=r"blocks\.0\.q: adapter 'default' was fitted by LoftQ to NF4 with double"):
        lorakit.quantize(model, bits=8)
    assert type(model.blocks[0]["q"]) is not LoraQuantLinear
    with pytest.raises(ValueError, match="init 'loftq' replaces base weights, which adapters"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["v"], init="loftq"), adapter="second")


def test_dora_on_a_quantized_base_and_residual_inits_refused():
    quantized = lorakit.quantize(_model())
    lorakit.add_lora(quantized, lorakit.LoraConfig(r=4, target_modules=["q"], use_dora=True))
    _randomize_B(quantized)
    reference = _model()  # the same model with the dequantized weights in fp32
    with torch.no_grad():
        for path in ("blocks.0.q", "blocks.1.q"):
            reference.get_submodule(path).weight.copy_(dequantize(quantized.get_submodule(path).base_layer))
    lorakit.add_lora(reference, lorakit.LoraConfig(r=4, target_modules=["q"], use_dora=True))
    reference.load_state_dict({k: v for k, v in quantized.state_dict().items() if ".adapters." in k}, strict=False)
    x = torch.randn(3, 64)
    # DoRA reads the dequantized weight: the same numbers as on its fp32 copy (the q layers' own outputs; the
    # models' other layers differ, 4-bit against fp32)
    for path in ("blocks.0.q", "blocks.1.q"):
        assert torch.allclose(quantized.get_submodule(path)(x), reference.get_submodule(path)(x), atol=FP32_TOL)
    lorakit.merge(quantized)  # DoRA's merged weight, requantized
    assert len(lorakit.merge_errors(quantized)) == 2
    lorakit.unmerge(quantized)
    with pytest.raises(ValueError, match="init 'pissa' replaces the base weight by a residual, which a quantized"):
        lorakit.add_lora(lorakit.quantize(_model()), lorakit.LoraConfig(r=4, target_modules=["q"], init="pissa"))
    pissa = lorakit.add_lora(_model(), lorakit.LoraConfig(r=4, target_modules=["q"], init="pissa"))
    with pytest.raises(ValueError, match=r"blocks\.0\.q: adapter 'default' replaced the base weight by a residual"):
        lorakit.quantize(pissa)
    assert type(pissa.blocks[0]["mlp"]) is nn.Linear
