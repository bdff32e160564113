"""``lorakit train --use-dora`` and ``--init pissa --convert-to-lora`` end to end on a tiny BERT."""

import json

import torch

from lorakit.cli.main import main
from tests.cli.conftest import FAST


def _logits(model, tok):
    batch = tok(["good movie .", "awful movie ."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_train_dora_then_inspect_and_merge(bert_dir, cls_data, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from lorakit.models import load_with_adapter

    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(out), "--use-dora",
                 *FAST]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["use_dora"] is True
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, tok, _ = load_with_adapter(out / "adapter")
    # merged DoRA == unmerged DoRA (fp32: rounding of the row norms and one matmul order)
    torch.testing.assert_close(_logits(plain, tok), _logits(adapted, tok), atol=1e-5, rtol=1e-5)


def test_train_pissa_convert_to_lora(bert_dir, cls_data, tmp_path, capsys):
    from lorakit.models import load_with_adapter

    out = tmp_path / "run"
    args = ["train", "--model", str(bert_dir), "--data", str(cls_data), *FAST]
    assert main([*args, "--output-dir", str(tmp_path / "bad"), "--convert-to-lora"]) == 2
    assert "--convert-to-lora needs an --init" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--output-dir", str(out), "--init", "pissa", "--convert-to-lora"]) == 0
    assert "plain LoRA" in capsys.readouterr().out
    cfg = json.loads((out / "adapter-lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (16, True)
    pissa, tok, _ = load_with_adapter(out / "adapter")  # reruns PiSSA on the base, then loads A, B
    converted, _, _ = load_with_adapter(out / "adapter-lora")  # the untouched base + a rank-16 plain LoRA
    torch.testing.assert_close(_logits(converted, tok), _logits(pissa, tok), atol=1e-5, rtol=1e-5)
