"""Tiny saved models and data sets shared by the CLI tests (built once per session; the tests only read them)."""

import pytest

from tests.conftest import save_random
from tests.train.helpers_tokenizer import minilm_tokenizer, tiny_tokenizer

# one short training run: a checkpoint every 3 steps, a log line every step
FAST = ["--epochs", "1", "--batch-size", "4", "--save-every", "3", "--log-every", "1", "--progress", "false",
        "--lr", "1e-2"]


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=128,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_random(tmp_path_factory.mktemp("gpt2"), GPT2LMHeadModel, cfg, tok)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=tok.vocab_size, max_position_embeddings=128)
    return save_random(tmp_path_factory.mktemp("bert"), BertForSequenceClassification, cfg, tok)


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    rows = ["sentence\tlabel"] + [f"{w} movie .\t{int(w in ('good', 'great'))}" for w in
                                  ["good", "bad", "great", "awful"] * 6]
    (d / "train.tsv").write_text("\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    return d


@pytest.fixture(scope="session")
def e2e_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    lines = ["name : The Vaults | Type : pub||The Vaults pub near Cafe Adriatic . ",
             "name : The Vaults | Type : pub||The Vaults is a pub . ",
             "name : Cafe Adriatic | area : city centre||Cafe Adriatic is in the city centre . "] * 4
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    (d / "valid.txt").write_text("\n".join(lines[:3]) + "\n")
    return d
