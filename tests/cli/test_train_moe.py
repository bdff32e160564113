"""``lorakit train --target-modules all-linear --target-parameters all-experts`` on a tiny Qwen3-MoE, then
``inspect`` (per-expert ranks and norms) and ``merge``."""

import json

import pytest
import torch

from lorakit.cli.main import main
from tests.cli.conftest import FAST
from tests.conftest import save_random
from tests.train.helpers_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    tok = tiny_tokenizer()
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return save_random(tmp_path_factory.mktemp("qwen3moe"), AutoModelForCausalLM.from_config, cfg, tok)


def test_train_every_linear_layer_and_every_expert_then_inspect_and_merge(moe_dir, e2e_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_with_adapter

    out = tmp_path / "run"
    assert main(["train", "--model", str(moe_dir), "--data", str(e2e_data), "--task", "e2e", "--r", "2",
                 "--target-modules", "all-linear", "--target-parameters", "all-experts", "--output-dir", str(out),
                 *FAST]) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert saved["lora_dropout"] == 0.0 and "q_proj" in saved["target_modules"]
    capsys.readouterr()
    assert main(["inspect", str(out / "adapter"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    experts = [row for row in layers if "experts" in row]
    assert len(experts) == 4 and {row["experts"] for row in experts} == {4} and {row["rank"] for row in experts} == {2}
    assert all(len(row["expert_norms"]) == 4 and max(row["expert_norms"]) > 0 for row in experts)  # trained: B != 0
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted, _, _ = load_with_adapter(out / "adapter")
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():  # merged == unmerged: fp32 rounding of W + ΔW and another kernel order
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_expert_options_are_checked_before_anything_is_written(moe_dir, tmp_path, capsys):
    for extra, message in [(["--dropout", "0.1"], "dropout=0.1 cannot be used with target_parameters"),
                           (["--use-dora"], "use_dora cannot be used with target_parameters")]:
        assert main(["train", "--model", str(moe_dir), "--target-parameters", "experts.gate_up_proj", *extra,
                     "--output-dir", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
