"""``lorakit inspect`` on malformed checkpoints: exit 2 and one line naming the file and the problem (issue #8
item 14)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli.main import main
from lorakit.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import MLP

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
    (lambda p: (p / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": True})), "r must be a positive"),
    (lambda p: (p / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lorakit": "x"})),
     "'lorakit' must be an object"),
    (lambda p: (p / CONFIG_NAME).write_text("{" * 100_000), "not valid JSON|nested too deeply"),
], ids=["1d-A", "missing-B", "r-bool", "lorakit-string", "deep"])
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
