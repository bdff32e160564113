"""``lorakit train --quantize``: QLoRA end to end on a tiny saved BERT; ``lorakit merge`` of the adapter writes a
full-precision model; without bitsandbytes a one-line error names the extra."""

import json
import sys

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from tests.cli.conftest import FAST

bnb = pytest.importorskip("bitsandbytes")


def test_train_quantize_nf4_then_merge_onto_the_full_precision_base(bert_dir, cls_data, tmp_path, capsys,
                                                                     monkeypatch):
    seen, real = [], lorakit.variants.quantized.quantize

    def spy(model, **kwargs):
        seen.append(kwargs)
        result = real(model, **kwargs)
        seen.append(sorted({type(m).__name__ for m in model.modules() if "bitsandbytes" in type(m).__module__}))
        return result

    monkeypatch.setattr(lorakit, "quantize", spy)  # train's
    monkeypatch.setattr(lorakit.variants.quantized, "quantize", spy)  # eval's
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(out),
                 "--quantize", "nf4", *FAST]) == 0
    dev_after = capsys.readouterr().out.split("dev after")[1].split()[:2]
    assert seen == [{"bits": 4, "quant_type": "nf4"}, ["Linear4bit"]]  # the run's base was 4-bit
    info = json.loads(capsys.readouterr().out) if main(["inspect", str(out / "adapter"), "--json"]) == 0 else {}
    assert {layer["rank"] for layer in info["layers"]} == {8} and info["base_quantization"] == "nf4"

    seen.clear()
    assert main(["eval", str(out / "adapter")]) == 0  # rebuilds the 4-bit base the adapter was trained on...
    assert capsys.readouterr().out.split()[:2] == dev_after  # ...so it scores what the run printed, exactly
    assert seen == [{"bits": 4, "quant_type": "nf4"}, ["Linear4bit"]]
    seen.clear()
    assert main(["eval", str(out / "adapter"), "--quantize", "none"]) == 0 and seen == []  # the fp32 base
    capsys.readouterr()

    merged = tmp_path / "merged"
    assert main(["merge", str(out / "adapter"), "--out", str(merged)]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.models import load_with_adapter

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert not any("bitsandbytes" in type(m).__module__ or "lorakit" in type(m).__module__ for m in plain.modules())
    adapted, _, _ = load_with_adapter(out / "adapter", quantize="none")  # fp32 base + the adapter of its 4-bit copy
    batch = AutoTokenizer.from_pretrained(merged)(["good movie .", "awful movie ."], return_tensors="pt", padding=True)
    with torch.no_grad():  # fp32 merge: summation order only
        torch.testing.assert_close(plain(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)


def test_train_quantize_without_bitsandbytes_names_the_extra(bert_dir, cls_data, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(out),
                 "--quantize", "int8", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lorakit: error: 4/8-bit bases need bitsandbytes: pip install 'lorakit[qlora]'"
    assert not out.exists()


def test_base_quantization_choice_and_its_bad_input(monkeypatch):
    from lorakit.models import ModelError, base_quantization_for

    assert base_quantization_for({"a": "nf4", "b": "nf4"}) == "nf4"
    assert base_quantization_for({"a": "nf4"}, "none") is None and base_quantization_for({}, "auto") is None
    assert base_quantization_for({"a": None}, "int8") == "int8"  # an explicit choice wins over the record
    with pytest.raises(ModelError, match=r"trained on different bases \(\{'a': 'nf4', 'b': None\}\); pass --quantize"):
        base_quantization_for({"a": "nf4", "b": None})
    with pytest.raises(ValueError, match="quantize must be one of .* got 'nf5'"):
        base_quantization_for({}, "nf5")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelError, match=r"^a was trained on a base quantized to nf4, which needs bitsandbytes \(pip install "
                                         r"'lorakit\[qlora\]'\); or load the adapter on the full-precision base"):
        base_quantization_for({"a": "nf4"})
