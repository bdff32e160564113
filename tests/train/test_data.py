"""Tests for lorakit.train.data: file formats, GLUE layouts, split resolution, errors."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from lorakit.train.data import DataError, default_data_dir, read_records, resolve_splits
from tests.conftest import shared_data


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --- real GLUE / SFT / E2E files -------------------------------------------------------------


def test_sst2_dev_header_and_counts():
    recs = read_records(shared_data("sst2/dev.tsv"))
    assert len(recs) == 872
    assert list(recs[0]) == ["sentence", "label"]
    assert recs[0]["sentence"] == "it 's a charming and often affecting journey ."  # trailing space stripped
    assert Counter(r["label"] for r in recs) == {"1": 444, "0": 428}


def test_mrpc_dev_bom_header_and_quotes():
    recs = read_records(shared_data("mrpc/dev.tsv"))
    assert len(recs) == 408
    assert list(recs[0]) == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]  # BOM gone
    assert recs[0]["#2 String"].startswith('" The foodservice pie')  # unbalanced quote kept as text
    assert Counter(r["Quality"] for r in recs) == {"1": 279, "0": 129}


def test_rte_dev_string_labels():
    recs = read_records(shared_data("rte/dev.tsv"))
    assert len(recs) == 277
    assert list(recs[0]) == ["index", "sentence1", "sentence2", "label"]
    assert Counter(r["label"] for r in recs) == {"entailment": 146, "not_entailment": 131}


@pytest.mark.parametrize(("split", "n", "ones"), [("train", 8551, 6023), ("dev", 1043, 721)])
def test_cola_headerless_detected(split, n, ones):
    recs = read_records(shared_data(f"cola/{split}.tsv"))
    assert len(recs) == n  # the first line is data, not a header
    assert list(recs[0]) == ["source", "label", "mark", "sentence"]
    assert sum(r["label"] == "1" for r in recs) == ones


def test_e2e_valid_lines():
    recs = read_records(shared_data("e2e/valid.txt"))
    assert len(recs) == 4672
    assert recs[0]["mr"] == "name : Alimentum | area : city centre | family friendly : no"
    assert recs[0]["ref"].endswith("not family - friendly .")  # trailing space stripped
    assert len({r["mr"] for r in recs}) == 547


def test_sft_files():
    assert len(read_records(shared_data("gsm8k/test.jsonl"))) == 1319
    evals = read_records(shared_data("alpaca_eval/alpaca_eval.json"))
    assert len(evals) == 805 and set(evals[0]) == {"dataset", "instruction", "output", "generator"}
    seed = read_records(shared_data("self_instruct/seed_tasks.jsonl"))
    assert len(seed) == 175 and seed[1]["instances"][0]["input"] == "Night : Day :: Right : Left"


def test_resolve_splits_on_shared_dirs():
    e2e = resolve_splits(shared_data("e2e"))
    assert {k: p.name for k, p in e2e.items()} == {
        "train": "train.txt",
        "dev": "valid.txt",
        "test": "test.txt",
    }
    sst2 = resolve_splits(shared_data("sst2"))
    assert {k: p.name for k, p in sst2.items()} == {"train": "train.tsv", "dev": "dev.tsv"}


# --- packaged SST-2 slice --------------------------------------------------------------------


def test_default_data_dir_slice():
    d = default_data_dir()
    assert (d / "README.md").is_file()
    train, dev = read_records(d / "train.tsv"), read_records(d / "dev.tsv")
    assert len(train) == 5000 and Counter(r["label"] for r in train) == {"0": 2500, "1": 2500}
    assert len(dev) == 872
    assert sum(p.stat().st_size for p in d.iterdir()) < 1_000_000
    assert set(resolve_splits(d)) == {"train", "dev"}


def _slice_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_sst2_slice.py"
    spec = importlib.util.spec_from_file_location("make_sst2_slice", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_sentences_drops_rows_inside_another_row():
    rows = ["a fine film \t1\n", "fine film \t1\n", "film \t1\n", "a fine \t1\n", "dull \t0\n", "fine film , dull \t0\n"]
    assert _slice_script().whole_sentences(rows) == ["a fine film \t1\n", "fine film , dull \t0\n"]


def test_packaged_slice_is_rebuilt_byte_for_byte_from_glue(tmp_path):
    _slice_script().make_slice(shared_data("sst2"), tmp_path)
    for name in ("train.tsv", "dev.tsv"):
        assert (tmp_path / name).read_bytes() == (default_data_dir() / name).read_bytes(), name


# --- formats on small fixtures ---------------------------------------------------------------


def test_csv_with_header_and_quoted_commas(tmp_path):
    path = write(tmp_path, "train.csv", 'text,label\n"good, really",pos\nbad,neg\n')
    assert read_records(path) == [{"text": "good, really", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_headerless_two_column_tsv(tmp_path):
    path = write(tmp_path, "train.tsv", "a fine film\t1\nawful\t0\n\n")
    assert read_records(path) == [{"text": "a fine film", "label": "1"}, {"text": "awful", "label": "0"}]
    assert read_records(path, columns=["s", "y"])[1] == {"s": "awful", "y": "0"}
    assert read_records(path, header=True) == [{"a fine film": "awful", "1": "0"}]


def test_jsonl_and_json_array(tmp_path):
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}]
    jl = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = write(tmp_path, "a.json", json.dumps(rows))
    assert read_records(jl) == rows == read_records(js)


def test_resolve_splits_file_and_aliases(tmp_path):
    f = write(tmp_path, "mine.jsonl", "{}\n")
    assert resolve_splits(f) == {"train": f}
    for name in ("train.jsonl", "validation.jsonl", "test.csv", "notes.md"):
        write(tmp_path, name, "{}\n")
    splits = resolve_splits(tmp_path)
    assert {k: p.name for k, p in splits.items()} == {
        "train": "train.jsonl",
        "dev": "validation.jsonl",
        "test": "test.csv",
    }


# --- errors ----------------------------------------------------------------------------------


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.tsv$"):
        read_records(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="data path not found"):
        resolve_splits(tmp_path / "nope")


def test_resolve_splits_errors(tmp_path):
    write(tmp_path, "readme.md", "x")
    with pytest.raises(DataError, match=r"no train/dev/test file .*found: readme\.md$"):
        resolve_splits(tmp_path)
    write(tmp_path, "dev.tsv", "a\tb\n")
    write(tmp_path, "valid.txt", "a||b\n")
    with pytest.raises(DataError, match=r"more than one file for split 'dev': dev\.tsv, valid\.txt"):
        resolve_splits(tmp_path)


def test_invalid_utf8_names_offset_and_line(tmp_path):
    path = write(tmp_path, "bad.tsv", b"sentence\tlabel\ngood\t1\nb\xffd\t0\n")
    with pytest.raises(DataError, match=r"bad\.tsv: invalid UTF-8 at byte offset 23 \(line 3\)"):
        read_records(path)
    path = write(tmp_path, "bom.tsv", b"\xef\xbb\xbfsentence\tlabel\nb\xffd\t0\n")  # offsets count the BOM
    with pytest.raises(DataError, match=r"bom\.tsv: invalid UTF-8 at byte offset 19 \(line 2\)"):
        read_records(path)


def test_malformed_jsonl_line_number(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(DataError, match=r"x\.jsonl: malformed JSON on line 3"):
        read_records(path)
    path = write(tmp_path, "y.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, expected an object"):
        read_records(path)


def test_json_errors(tmp_path):
    with pytest.raises(DataError, match="malformed JSON on line 2, column 1"):
        read_records(write(tmp_path, "a.json", '[{"a": 1},\n]'))
    with pytest.raises(DataError, match="expected a JSON array of objects, got a JSON dict"):
        read_records(write(tmp_path, "b.json", '{"a": 1}'))


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.tsv", "sentence\tlabel\n"), ("e.txt", ""), ("e.csv", "")],
)
def test_empty_dataset(tmp_path, name, content):
    with pytest.raises(DataError, match=r"empty dataset \(no records\)"):
        read_records(write(tmp_path, name, content))


def test_ragged_row_and_bad_e2e_line(tmp_path):
    with pytest.raises(DataError, match=r"line 3 has 3 fields, expected 2 \(sentence, label\)"):
        read_records(write(tmp_path, "r.tsv", "sentence\tlabel\nok\t1\nbad\t0\textra\n"))
    with pytest.raises(DataError, match="line 2 has no '\\|\\|' separator"):
        read_records(write(tmp_path, "r.txt", "name : A||A is here .\nname : B A\n"))


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.parquet'"):
        read_records(write(tmp_path, "x.parquet", "x"))


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
