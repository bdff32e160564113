"""Bad input a probe of every subcommand found through to a traceback, a silent success or a lost file: a base
model with a truncated checkpoint or a config.json of the wrong types, ``merge --out`` over its own inputs, an
``eval --task`` of another kind than the adapter, ``generate`` with an empty adapter name or a seed out of range,
``analyze --output-dir`` on a file. Each is one ``lorakit: error:`` line, exit 2, nothing written."""

import json
import shutil

import pytest

from tests.cli.test_bad_input import fails
from tests.serve.helpers import save_adapters, save_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(base dir, adapter dir)``: a tiny random LLaMA and one causal-LM adapter trained (drawn) on it."""
    root = tmp_path_factory.mktemp("saved")
    base = save_llama(root / "llama", layers=1, hidden=16)
    return base, save_adapters(base, root / "adapters", ["a"])["a"]


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _broken(base, tmp_path, name, edit):
    broken = tmp_path / name
    shutil.copytree(base, broken)
    edit(broken)
    return broken


def _config(**changes):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


@pytest.mark.parametrize("name, edit, message", [
    ("truncated", _truncate, "cannot load model 'BASE': its safetensors weights are not readable: Error while "
                             "deserializing header"),
    ("hidden-str", _config(hidden_size="abc"), "BASE/config.json: Field 'hidden_size' expected int, got str "
                                               "(value: 'abc')"),
    ("vocab-float", _config(vocab_size=3.5), "BASE/config.json: Field 'vocab_size' expected int, got float (value: 3.5)"),
])
def test_a_broken_base_model_is_one_line_in_every_command(saved, tmp_path, capsys, name, edit, message):
    base, adapter = saved
    broken = _broken(base, tmp_path, name, edit)
    out = tmp_path / "out"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "say hi", "response": "hi there"}) + "\n")
    for argv in (["merge", str(adapter), "--model", str(broken), "--out", str(out)],
                 ["eval", str(adapter), "--model", str(broken), "--data", str(data)],
                 ["generate", "--model", str(broken), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["analyze", str(adapter), "--model", str(broken)],
                 ["train", "--model", str(broken), "--data", str(data), "--task", "sft", "--output-dir", str(out)]):
        fails(argv, capsys, message.replace("BASE", str(broken)), out)


def test_merge_refuses_an_out_that_holds_its_adapter_or_base(saved, tmp_path, capsys):
    base, adapter = shutil.copytree(saved[0], tmp_path / "models" / "llama"), tmp_path / "adapters" / "a"
    shutil.copytree(saved[1], adapter)  # copies: before the fix, --force replaced them with the merged model
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    before = {path: _tree(path) for path in (base, adapter)}
    for out, what in [(adapter, f"the adapter to merge ({adapter})"), (adapter.parent, f"the adapter to merge ({adapter})"),
                      (base, f"the base model ({base})"), (base.parent, f"the base model ({base})")]:
        for model in ([], ["--model", str(base)]):  # the base the adapter names, or the one given
            fails(["merge", str(adapter), *model, "--out", str(out), "--force"], capsys,
                  f"--out {out} holds {what}; pick another directory")
    assert {path: _tree(path) for path in (base, adapter)} == before  # nothing replaced


def test_eval_refuses_a_task_of_another_kind_than_the_adapter(saved, tmp_path, capsys, monkeypatch):
    import lorakit.models

    _, adapter = saved
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\ngood movie .\t1\nbad movie .\t0\n")
    report = tmp_path / "report.json"
    with monkeypatch.context() as m:  # refused from the adapter's config, before the base model loads
        m.setattr(lorakit.models, "load_with_adapter", lambda *a, **k: pytest.fail("loaded before --task was checked"))
        fails(["eval", str(adapter), "--data", str(data), "--task", "classification", "--output", str(report)],
              capsys, "--task classification needs a SEQ_CLS adapter; this one is CAUSAL_LM (use --task sft or e2e)",
              report)
    sft = tmp_path / "dev.jsonl"
    sft.write_text(json.dumps({"prompt": "say hi", "response": "hi there"}) + "\n")
    fails(["eval", str(adapter), "--data", str(sft), "--task", "e2e", "--output", str(report)], capsys,
          f"{sft}: record 1: no E2E fields", report)  # the file is named, as for the other tasks


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "=PATH"], "--adapter '=PATH': the NAME before '=' is empty"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**63), got -1"),
    (["--seed", str(2**70)], f"argument --seed: expected an integer in [0, 2**63), got {2**70}"),
])
def test_generate_refuses_an_empty_adapter_name_and_a_seed_out_of_range(saved, capsys, flags, message):
    base, adapter = saved
    flags = [f.replace("PATH", str(adapter)) for f in flags]
    fails(["generate", "--model", str(base), "--prompt", "hi", "--max-new-tokens", "2", *flags], capsys,
          message.replace("PATH", str(adapter)))


def test_analyze_checks_its_output_dir_first(saved, tmp_path, capsys, monkeypatch):
    import lorakit.analyze

    _, adapter = saved

    def never(*a, **k):
        raise AssertionError("ran before its output was checked")

    monkeypatch.setattr(lorakit.analyze, "run_analysis", never)
    file = tmp_path / "a-file"
    file.write_text("x")
    fails(["analyze", str(adapter), "--output-dir", str(file)], capsys,
          f"--output-dir {file} exists and is not a directory")
    fails(["analyze", str(adapter), "--output-dir", str(file / "sub")], capsys, f"{file} is a file, not a directory")
    assert file.read_text() == "x"
