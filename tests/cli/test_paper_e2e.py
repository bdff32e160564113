"""E2E NLG (the paper's Table 3 pipeline) on the real E2E files: train -> beam search -> the five metrics, on a
tiny random-init GPT-2 (the toy-data version is in test_cli.py; this one checks the real format end to end)."""

import json

import pytest

from lorakit.cli.main import main
from tests.conftest import save_random, shared_data
from tests.train.helpers_tokenizer import tiny_tokenizer


def test_e2e_pipeline_on_real_data(tmp_path, capsys):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("pycocoevalcap")
    from transformers import GPT2Config, GPT2LMHeadModel

    train_lines = shared_data("e2e/train.txt").read_text(encoding="utf-8").splitlines()[:24]
    valid_lines = shared_data("e2e/valid.txt").read_text(encoding="utf-8").splitlines()
    mrs = []
    for line in valid_lines:  # every reference of the first two MRs (the metrics are multi-reference)
        mr = line.split("||")[0]
        if mr not in mrs and len(mrs) == 2:
            break
        mrs += [] if mr in mrs else [mr]
    data = tmp_path / "e2e"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    kept = [line for line in valid_lines if line.split("||")[0] in mrs]
    (data / "valid.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
    tok = tiny_tokenizer()
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=128,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = save_random(tmp_path / "gpt2", GPT2LMHeadModel, cfg, tok)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--task", "e2e", "--target-modules",
                 "c_attn", "--r", "4", "--alpha", "32", "--epochs", "1", "--batch-size", "8", "--progress", "false",
                 "--output-dir", str(out)]) == 0
    assert "24 train" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", str(out / "adapter"), "--num-beams", "3", "--max-new-tokens", "6",
                 "--output", str(report)]) == 0  # --data and --task e2e: the run's (its type alone says CAUSAL_LM)
    result = json.loads(report.read_text())
    assert set(result["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert len(result["hypotheses"]) == 2  # one generation per distinct MR
    assert all(v >= 0 for v in result["metrics"].values())
