"""``lorakit inspect`` / ``merge`` on malformed or poisoned checkpoints: exit 2 and one line naming the problem,
nothing written (issue #8 items 14 and 15)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli.main import main
from lorakit.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from lorakit.core.layers import LoraLayer
from tests.conftest import MLP, save_random

A = "base_model.model.fc1.lora_A.weight"
B = "base_model.model.fc1.lora_B.weight"


@pytest.fixture
def adapter(tmp_path):
    lorakit.save_adapter(lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"])), tmp_path)
    return tmp_path


def _tensors(path, **changes):
    tensors = load_file(path / WEIGHTS_NAME)
    tensors.update(changes)
    save_file({k: v for k, v in tensors.items() if v is not None}, path / WEIGHTS_NAME)


@pytest.mark.parametrize("edit, message", [
    (lambda p: _tensors(p, **{A: torch.zeros(12)}), r"lora_A.weight \(12,\) and .*lora_B.weight \(24, 2\) are not a "
                                                    "rank-r pair"),
    (lambda p: _tensors(p, **{B: None}), r"lora_A.weight has no matching base_model.model.fc1.lora_B.weight"),
    (lambda p: _tensors(p, **{A: None}), r"lora_B.weight has no matching base_model.model.fc1.lora_A.weight"),
    (lambda p: (p / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": True})), "r must be a positive"),
    (lambda p: (p / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lorakit": "x"})),
     "'lorakit' must be an object"),
    (lambda p: (p / CONFIG_NAME).write_text("{" * 100_000), "not valid JSON|nested too deeply"),
], ids=["1d-A", "missing-B", "missing-A", "r-bool", "lorakit-string", "deep"])
def test_inspect_malformed_checkpoint_exits_2_with_one_line(adapter, edit, message, capsys):
    edit(adapter)
    assert main(["inspect", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit: error: ") and str(adapter) in err
    assert re.search(message, err), err


def test_inspect_reports_a_good_checkpoint(adapter, capsys):
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(layer["module"], layer["rank"]) for layer in info["layers"]] == [("fc1", 2)]


def test_merge_refuses_non_finite_weights_with_one_line(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    from tests.train.helpers_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     vocab_size=tok.vocab_size, max_position_embeddings=32)
    base = save_random(tmp_path / "base", BertForSequenceClassification, cfg, tok)
    model = lorakit.add_lora(BertForSequenceClassification.from_pretrained(base),
                             lorakit.LoraConfig(r=2, target_modules=["query"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(1e30)  # B·A overflows (2 · 1e60): every merged query weight is inf
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "adapter"), "--model", str(base), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()  # transformers' loading progress bar aside
    assert err[-1].startswith("lorakit: error: merging adapter 'default' gives non-finite weights in bert."), err
    assert not any("Traceback" in line for line in err) and not out.exists()


# ----- issue 17 item 1: a scaling that is not finite: one line and exit 2 from every command that reads the adapter --
def test_a_scaling_that_is_not_finite_is_one_line_exit_2(adapter, tmp_path_factory, capsys):
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 1e308}))
    data = tmp_path_factory.mktemp("data")
    (data / "dev.tsv").write_text("sentence\tlabel\ngood .\t1\n")
    for argv in (["inspect", str(adapter)], ["eval", str(adapter), "--data", str(data)],
                 ["generate", "--adapter", f"x={adapter}", "--prompt", "hi"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lorakit: error: ") and err.count("\n") == 1, err
        assert f"{adapter / CONFIG_NAME}: scaling: alpha=1e+308 / r=2 = 5e+307 is not finite in torch.float32" in err


# ----- issue 17 item 3: inspect runs load_adapter's checks on the file (check_adapter_tensors) --------------------
MAGNITUDE = "base_model.model.fc1.lora_magnitude_vector"


@pytest.mark.parametrize("use_dora, edit, message", [
    (True, lambda p: _tensors(p, **{MAGNITUDE: None}),
     f"adapter_config.json has use_dora true, but {MAGNITUDE} (the DoRA magnitude of fc1) is missing"),
    (False, lambda p: _tensors(p, **{MAGNITUDE: torch.ones(24)}),
     f"{MAGNITUDE} is a DoRA magnitude, but adapter_config.json has use_dora false"),
    (False, lambda p: (p / CONFIG_NAME).write_text(json.dumps({**json.loads((p / CONFIG_NAME).read_text()), "r": 3})),
     "tensor base_model.model.fc1.lora_A.weight has shape (2, 12), but adapter_config.json gives rank 3 for fc1"),
], ids=["dora-without-magnitude", "magnitude-without-dora", "rank"])
def test_inspect_refuses_what_load_adapter_refuses(tmp_path, use_dora, edit, message, capsys):
    lorakit.save_adapter(lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"], use_dora=use_dora)),
                         tmp_path)
    edit(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"lorakit: error: {tmp_path / WEIGHTS_NAME}: {message}\n", err
    model = MLP()
    with pytest.raises(ValueError) as e:
        lorakit.load_adapter(model, tmp_path)
    assert str(e.value) == f"{tmp_path / WEIGHTS_NAME}: {message}"  # the same check, the same words
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
