"""``lorakit train --method adalora``: ranks allocated end to end, saved as plain LoRA; bad flags refused."""

import json

import pytest

from lorakit.cli.main import main
from tests.cli.conftest import FAST


def test_train_adalora_saves_the_allocated_ranks(bert_dir, cls_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(out), *FAST,
            "--method", "adalora", "--init-rank", "4", "--target-rank", "2", "--delta-t", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("ranks "))
    assert line.startswith("ranks        8 of 16 triplets kept: ")  # 4 layers (query, value x 2) x target 2
    live = {p: int(n) for p, n in (kv.split("=") for kv in line.split(": ", 1)[1].split())}
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == {p: max(n, 1) for p, n in live.items()}
    assert main(["inspect", str(out / "adapter"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert {la["module"]: la["rank"] for la in layers} == cfg["rank_pattern"]


@pytest.mark.parametrize("extra, message", [
    (["--target-rank", "2"], "--target-rank is an AdaLoRA option: add --method adalora"),
    (["--method", "adalora"], "--method adalora needs --target-rank"),
    (["--method", "adalora", "--init-rank", "2", "--target-rank", "3"], "exceeds the initial"),
])
def test_bad_adalora_flags_exit_2_and_write_nothing(bert_dir, cls_data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = main(["train", "--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(out), *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
