"""``lorakit train --task sft --add-tokens``: new special tokens, grown embeddings, only their rows trained; the
adapter rebuilds them in ``generate`` / ``eval`` / ``merge``. A tiny random LLaMA with tied embeddings and the
word-level test tokenizer (56 tokens, so the added ones get ids 56 and 57)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from tests.conftest import save_random
from tests.train.helpers_tokenizer import tiny_tokenizer

FAST = ["--epochs", "1", "--batch-size", "4", "--progress", "false", "--lr", "5e-2", "--max-length", "32"]
NEW = "<|im_start|>,<|im_end|>"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_random(tmp_path_factory.mktemp("llama"), LlamaForCausalLM, cfg, tok)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    rows = [{"prompt": f"say {w}", "response": f"<|im_start|> {w} there <|im_end|>"} for w in ["hi", "cat", "dog"] * 4]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return d


def _logits(model, tok):
    ids = tok(["say hi <|im_start|> hi there <|im_end|>"], return_tensors="pt")["input_ids"]
    assert ids[0, 2:].tolist()[0] == 56 and 57 in ids[0].tolist()  # each added token is one token
    with torch.no_grad():
        return model(ids).logits


def test_add_tokens_trains_their_rows_and_every_command_rebuilds_them(llama_dir, chat_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import load_with_adapter

    out = tmp_path / "run"
    assert main(["train", "--task", "sft", "--model", str(llama_dir), "--data", str(chat_data), "--output-dir",
                 str(out), "--add-tokens", NEW, "--target-modules", "q_proj", *FAST]) == 0
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == [56, 57] and cfg["target_modules"] == ["q_proj"]
    rows = load_file(adapter / "adapter_model.safetensors")["base_model.model.model.embed_tokens.token_adapter."
                                                              "trainable_tokens_delta"]
    assert rows.shape == (2, 16)
    grown = AutoModelForCausalLM.from_pretrained(llama_dir)
    grown.resize_token_embeddings(58)  # what the loader rebuilds: the new rows start as the mean row
    assert not torch.allclose(rows, grown.model.embed_tokens.weight[56:]), "the new rows did not train"

    model, tok, _ = load_with_adapter(adapter)
    assert model.get_input_embeddings().weight.shape[0] == 58 and len(tok) == 58
    capsys.readouterr()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    # merged rows == the adapter's rows (fp32: the same values, the head's matmul in another order)
    torch.testing.assert_close(_logits(merged, merged_tok), _logits(model, tok), atol=1e-5, rtol=1e-5)
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "3", "--prompt", "say hi"]) == 0
    assert main(["eval", str(adapter), "--data", str(chat_data), "--task", "sft"]) == 0


def test_tokens_alone_and_refusals(llama_dir, chat_data, tmp_path, capsys):
    base = ["train", "--task", "sft", "--model", str(llama_dir), "--data", str(chat_data), *FAST]
    assert main([*base, "--output-dir", str(tmp_path / "bad"), "--target-modules", "none"]) == 2
    assert "--target-modules none adapts nothing without --add-tokens" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "bad"), "--add-tokens", " , "]) == 2
    assert "names no token" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "alone"
    assert main([*base, "--output-dir", str(out), "--add-tokens", NEW, "--target-modules", "none"]) == 0
    assert "trainable    32 of" in capsys.readouterr().out  # 2 rows x 16: nothing else trains
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TRAINABLE_TOKENS" and cfg["token_indices"] == [56, 57]
    assert main(["inspect", str(out / "adapter"), "--json"]) == 0
    (rows,) = json.loads(capsys.readouterr().out)["trainable_tokens"]
    assert (rows["module"], rows["ids"], rows["rows"], rows["vocab_size"]) == ("model.embed_tokens", [56, 57], 2, 58)
    assert rows["added_tokens"] == {"<|im_start|>": 56, "<|im_end|>": 57}
