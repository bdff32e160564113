"""Tests for lorakit.train.tasks: classification, SFT and E2E formatting, label masking, collate."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lorakit.train.data import IGNORE_INDEX, DataError, collate, read_records
from lorakit.train.tasks import (
    PLAIN_PREAMBLE,
    TASKS,
    classification_examples,
    e2e_examples,
    e2e_prompt_ids,
    group_references,
    load_task_data,
    sft_examples,
    sft_messages,
    sft_prompt_ids,
)
from tests.conftest import shared_data
from tests.train.helpers_tokenizer import minilm_tokenizer, tiny_tokenizer


@pytest.fixture(scope="module")
def bert():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


def toks(tok, ids):
    return tok.convert_ids_to_tokens(ids)


# --- classification --------------------------------------------------------------------------


def test_classification_single_sentence(bert):
    recs = [{"sentence": "a charming journey .", "label": "1"}, {"sentence": "bleak", "label": "0"}]
    data = classification_examples(recs, bert, max_length=16)
    assert data.num_labels == 2 and data.label_names == ["0", "1"]
    ex = data.examples[0]
    assert set(ex) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert toks(bert, ex["input_ids"]) == ["[CLS]", "a", "charming", "journey", ".", "[SEP]"]
    assert ex["attention_mask"] == [1] * 6 and ex["token_type_ids"] == [0] * 6
    assert [e["labels"] for e in data.examples] == [1, 0]


def test_classification_pair_mrpc_layout(bert):
    recs = [{"Quality": "1", "#1 ID": "1", "#2 ID": "2", "#1 String": "he ran", "#2 String": "he runs"}]
    ex = classification_examples(recs, bert).examples[0]
    assert toks(bert, ex["input_ids"]) == ["[CLS]", "he", "ran", "[SEP]", "he", "runs", "[SEP]"]
    assert ex["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert ex["labels"] == 1


def test_classification_truncates(bert):
    ex = classification_examples([{"text": "word " * 50, "label": 0}], bert, max_length=8).examples[0]
    assert len(ex["input_ids"]) == 8 and ex["input_ids"][-1] == bert.sep_token_id


def test_rte_string_labels_sorted_and_reused(bert):
    train = classification_examples(read_records(shared_data("rte/train.tsv"))[:200], bert)
    assert train.label_names == ["entailment", "not_entailment"]
    dev = classification_examples(read_records(shared_data("rte/dev.tsv")), bert, label_names=train.label_names)
    assert len(dev.examples) == 277
    assert Counter(e["labels"] for e in dev.examples) == {0: 146, 1: 131}
    assert 1 in dev.examples[0]["token_type_ids"]  # sentence1 + sentence2 pair


def test_cola_real_file(bert):
    data = classification_examples(read_records(shared_data("cola/dev.tsv")), bert)
    assert data.label_names == ["0", "1"]
    assert Counter(e["labels"] for e in data.examples) == {1: 721, 0: 322}


def test_given_label_names_by_name_or_index(bert):
    recs = [{"text": "x", "label": "pos"}, {"text": "y", "label": "0"}]
    data = classification_examples(recs, bert, label_names=["neg", "pos"])
    assert [e["labels"] for e in data.examples] == [1, 0]


def test_label_errors(bert):
    with pytest.raises(DataError, match=r"record 2: unknown label 'maybe'; known labels: neg, pos"):
        classification_examples(
            [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}], bert, label_names=["neg", "pos"]
        )
    with pytest.raises(DataError, match=r"record 1: label 2 out of range \[0, 2\)"):
        classification_examples([{"text": "a", "label": "2"}], bert, label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"record 2: label -1 out of range"):
        classification_examples([{"text": "a", "label": 1}, {"text": "b", "label": -1}], bert)
    with pytest.raises(DataError, match="record 1: empty label"):
        classification_examples([{"text": "a", "label": ""}], bert)
    with pytest.raises(DataError, match="non-integer numbers"):
        classification_examples([{"text": "a", "label": "0.5"}, {"text": "b", "label": 3.25}], bert)


def test_missing_columns_named(bert):
    with pytest.raises(DataError, match=r"missing text column .*; columns found: review, label$"):
        classification_examples([{"review": "a", "label": "1"}], bert)
    with pytest.raises(DataError, match=r"missing label column .*; columns found: text, y$"):
        classification_examples([{"text": "a", "y": "1"}], bert)
    with pytest.raises(DataError, match=r"missing column 'score'; columns found: text, label$"):
        classification_examples([{"text": "a", "label": "1"}], bert, label_field="score")
    data = classification_examples([{"review": "a", "y": "1"}], bert, text_field="review", label_field="y")
    assert data.examples[0]["labels"] == 1


def test_empty_records(bert, tiny):
    for fn, tok in ((classification_examples, bert), (sft_examples, tiny), (e2e_examples, tiny)):
        with pytest.raises(DataError, match="empty dataset"):
            fn([], tok)


# --- SFT -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "user"),
    [
        ({"prompt": "hi", "response": "hi there"}, "hi"),
        ({"instruction": "say hi", "input": "", "output": "hi"}, "say hi"),
        ({"instruction": "say hi", "input": "the cat", "output": "hi"}, "say hi\n\nthe cat"),
        ({"instruction": "say hi", "instances": [{"input": "a dog", "output": "hi"}]}, "say hi\n\na dog"),
        ({"question": "what is two plus two ?", "answer": "four"}, "what is two plus two ?"),
    ],
)
def test_sft_messages_layouts(record, user):
    msgs = sft_messages(record)
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[0]["content"] == user


def test_sft_messages_errors():
    with pytest.raises(DataError, match="no SFT fields: .*keys found: text"):
        sft_messages({"text": "x"})
    with pytest.raises(DataError, match="must end with an assistant turn"):
        sft_messages({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match="need role system/user/assistant"):
        sft_messages({"messages": [{"role": "bot", "content": "hi"}]})


def test_sft_plain_template_masks_prompt(tiny):
    ex = sft_examples([{"prompt": "what is two plus two ?", "response": "it is four ."}], tiny).examples[0]
    prompt = tiny(
        PLAIN_PREAMBLE + "### Instruction:\nwhat is two plus two ?\n\n### Response:\n",
        add_special_tokens=False,
    )["input_ids"]
    response = tiny("it is four .", add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert toks(tiny, response) == ["it", "is", "four", ".", "</s>"]


def test_sft_plain_prepends_distinct_bos(tiny):
    tok = tiny_tokenizer(bos=True)
    ex = sft_examples([{"prompt": "hi", "response": "hi"}], tok).examples[0]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == IGNORE_INDEX
    assert (
        ex["input_ids"][1:]
        == sft_examples([{"prompt": "hi", "response": "hi"}], tiny).examples[0]["input_ids"]
    )


def test_sft_chat_template_multi_turn(tiny):
    tok = tiny_tokenizer(chat_template=True)
    msgs = [
        {"role": "system", "content": "say hi"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat"},
    ]
    ex = sft_examples([{"messages": msgs}], tok).examples[0]
    words = toks(tok, ex["input_ids"])
    assert words == [
        "<|system|>",
        "say",
        "hi",
        "<|end|>",
        "<|user|>",
        "hi",
        "<|end|>",
        "<|assistant|>",
        "hi",
        "there",
        "<|end|>",
        "<|user|>",
        "the",
        "cat",
        "<|end|>",
        "<|assistant|>",
        "sat",
        "<|end|>",
        "</s>",
    ]
    trained = [w for w, lab in zip(words, ex["labels"], strict=True) if lab != IGNORE_INDEX]
    assert trained == ["hi", "there", "<|end|>", "sat", "<|end|>", "</s>"]
    trained_ids = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    assert [lab for lab in ex["labels"] if lab != IGNORE_INDEX] == trained_ids
    # plain template can be forced even when the tokenizer has a chat template
    plain = sft_examples([{"prompt": "hi", "response": "hi"}], tok, use_chat_template=False).examples[0]
    assert "<|user|>" not in toks(tok, plain["input_ids"])


def test_sft_chat_template_required(tiny):
    with pytest.raises(DataError, match="no chat_template"):
        sft_examples([{"prompt": "hi", "response": "hi"}], tiny, use_chat_template=True)


def test_sft_prompt_ids_is_prefix(tiny):
    for tok in (tiny, tiny_tokenizer(chat_template=True)):
        rec = {"prompt": "what is two plus two ?", "response": "it is four ."}
        ex = sft_examples([rec], tok).examples[0]
        first_loss = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX)
        assert sft_prompt_ids(rec, tok) == ex["input_ids"][:first_loss]


def test_sft_truncation_and_skip(tiny):
    rec = {"prompt": "hi", "response": "the cat sat on a mat ."}
    full = sft_examples([rec], tiny).examples[0]
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = sft_examples([rec], tiny, max_length=n_prompt + 2).examples[0]
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert cut["labels"][n_prompt:] == full["input_ids"][n_prompt : n_prompt + 2]
    data = sft_examples([rec, rec], tiny, max_length=n_prompt)  # prompt fills the window: no loss left
    assert data.examples == [] and data.skipped == 2


def test_sft_bad_record_names_index(tiny):
    with pytest.raises(DataError, match=r"^record 2: no SFT fields"):
        sft_examples([{"prompt": "hi", "response": "hi"}, {"foo": 1}], tiny)


def test_sft_real_files(tiny):
    for rel, n in (
        ("gsm8k/test.jsonl", 1319),
        ("self_instruct/seed_tasks.jsonl", 175),
        ("alpaca_eval/alpaca_eval.json", 805),
    ):
        data = load_task_data(shared_data(rel), "sft", tiny, max_length=64)
        assert len(data.examples) + data.skipped == n
        assert all(len(e["input_ids"]) <= 64 for e in data.examples)


# --- E2E -------------------------------------------------------------------------------------


def test_e2e_masks_context(tiny):
    recs = [{"mr": "name : The Vaults | Type : pub", "ref": "The Vaults pub ."}]
    ex = e2e_examples(recs, tiny).examples[0]
    words = toks(tiny, ex["input_ids"])
    # no BOS: the separator is EOS, as GPT-2's <|endoftext|> in the LoRA paper's data
    assert words == [
        "name",
        ":",
        "The",
        "Vaults",
        "<unk>",
        "Type",
        ":",
        "pub",
        "</s>",
        "The",
        "Vaults",
        "pub",
        ".",
        "</s>",
    ]
    assert ex["labels"] == [IGNORE_INDEX] * 9 + ex["input_ids"][9:]
    assert e2e_prompt_ids(recs[0]["mr"], tiny) == ex["input_ids"][:9]
    with_bos = tiny_tokenizer(bos=True)
    assert e2e_prompt_ids("name : pub", with_bos)[-1] == with_bos.bos_token_id


def test_e2e_context_completion_keys_and_truncation(tiny):
    recs = [{"context": "name : pub", "completion": "a pub ."}]
    ex = e2e_examples(recs, tiny, max_length=6).examples[0]
    assert toks(tiny, ex["input_ids"]) == ["name", ":", "pub", "</s>", "a", "pub"]
    assert ex["labels"][:4] == [IGNORE_INDEX] * 4
    assert e2e_examples(recs, tiny, max_length=4).skipped == 1


def test_group_references():
    recs = [{"mr": "a", "ref": "x"}, {"mr": "b", "ref": "y"}, {"mr": "a", "ref": "z"}]
    assert group_references(recs) == {"a": ["x", "z"], "b": ["y"]}
    with pytest.raises(DataError, match="record 1: no E2E fields"):
        group_references([{"text": "a"}])


def test_e2e_real_valid_grouping(tiny):
    recs = read_records(shared_data("e2e/valid.txt"))
    groups = group_references(recs)
    assert len(groups) == 547 and sum(map(len, groups.values())) == 4672
    data = e2e_examples(recs[:50], tiny)
    assert len(data.examples) == 50 and all(e["input_ids"][-1] == tiny.eos_token_id for e in data.examples)


# --- collate, table, loading -----------------------------------------------------------------


def test_collate_pads_right():
    batch = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_classification(bert):
    data = classification_examples([{"text": "a b c", "label": 1}, {"text": "a", "label": 0}], bert)
    out = collate(data.examples, bert.pad_token_id)
    assert out["labels"].tolist() == [1, 0] and out["labels"].shape == (2,)
    assert out["input_ids"].shape == (2, 5) and out["input_ids"][1, -1].item() == bert.pad_token_id
    assert out["token_type_ids"][1].tolist() == [0] * 5
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate(data.examples, None)


def test_tasks_table_and_load_errors(tmp_path, tiny):
    assert set(TASKS) == {"classification", "sft", "e2e"}
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "hi"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl: record 1: no SFT fields"):
        load_task_data(path, "sft", tiny)
    with pytest.raises(DataError, match="unknown task 'ner'"):
        load_task_data(path, "ner", tiny)


def test_load_packaged_sst2(bert):
    from lorakit.train.data import default_data_dir

    data = load_task_data(default_data_dir() / "dev.tsv", "classification", bert, max_length=64)
    assert data.num_labels == 2 and len(data.examples) == 872
