"""A data folder's ``labels.txt`` names the classes: the packaged SST-2 says negative / positive, and a run on
a folder with one records the names in its adapter (what ``lorakit serve`` and its playground show)."""

from __future__ import annotations

import json

import pytest

from lorakit.cli.main import main
from lorakit.train.data import DataError, default_data_dir, label_names_in


def test_packaged_sst2_names_its_classes():
    assert label_names_in(default_data_dir()) == ["negative", "positive"]


@pytest.mark.parametrize("text, error", [("", "empty"), ("a\n\nb\n", "line 2 is blank"),
                                         ("a\nb\na\n", "more than once"),
                                         ("a\n a \n", r"\['a'\] appear more than once")])
def test_a_bad_labels_file_is_named(tmp_path, text, error):
    (tmp_path / "labels.txt").write_text(text)
    with pytest.raises(DataError, match=error):
        label_names_in(tmp_path)


def test_a_run_records_the_folders_class_names(bert_dir, tmp_path, capsys):
    from safetensors import safe_open

    data = tmp_path / "data"
    data.mkdir()
    rows = ["sentence\tlabel"] + [f"{w} movie .\t{int(w == 'good')}" for w in ["good", "bad"] * 4]
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    (data / "labels.txt").write_text("negative\npositive\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "4", "--progress", "false", "--plot", "false"]) == 0, capsys.readouterr().out
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorakit"])
    assert meta["id2label"] == {"0": "negative", "1": "positive"}
