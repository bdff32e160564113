"""Bad input to every subcommand ends in one line, exit code 2, and nothing written (issue #8, items 17-23).

Most cases fail in the validation step, before any model or data loads; no test here trains a model."""

import json

import pytest

from lorakit.cli.main import build_parser, main, parse

FAST = ["--epochs", "1", "--batch-size", "4", "--progress", "false"]


def fails(argv, capsys, message, out=None):
    """``main(argv)`` exits 2 with one ``lorakit: error:`` line holding ``message``; ``out`` was not created."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lorakit: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert "weights_only" not in err
    if out is not None:
        assert not out.exists()  # nothing written
    return err


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\n" + "good movie .\t1\nbad movie .\t0\n" * 4)
    return d


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def _required_argv(sub) -> list[str]:
    """Values for a subcommand's positionals and required options, so that parsing reaches the config file."""
    argv = []
    for a in sub._actions:
        if a.option_strings and not a.required:
            continue
        value = str(sorted(a.choices)[0]) if a.choices else "1"
        argv += [value] if not a.option_strings else [a.option_strings[0], value]
    return argv


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_from_yaml_is_checked_like_its_flag(command, tmp_path, capsys):
    """Every option of every subcommand (those added later included): a YAML mapping where a value belongs is
    refused in one line naming the key and the file, before anything runs."""
    sub = _subparsers()[command]
    dests = [a.dest for a in sub._actions if a.dest not in ("help", "config", "run", "_parser")]
    assert len(dests) >= 2
    cfg = tmp_path / "c.yaml"
    for dest in dests:
        cfg.write_text(f"{dest}: {{x: 1}}\n")
        fails([command, *_required_argv(sub), "--config", str(cfg)], capsys, f"config file {cfg}: {dest}:")


def test_yaml_values_typed_like_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "run"
    for text, message in [("lr: fast", "lr: expected a number, got 'fast'"),
                          ("batch_size: 1.5", "batch_size: expected int, got 1.5"),
                          ("epochs: [1, 2]", "epochs: expected a single value"),
                          ("target_modules: {query: 1}", "target_modules: expected a single value"),
                          ("use_rslora: maybe", "use_rslora: expected true/false"),
                          ("shuffle: 3", "shuffle: expected true/false"),
                          ("task: poetry", "task: expected one of classification, e2e, sft"),
                          ("max_length: -5", "max_length: expected an integer >= 1, got -5"),
                          ("lr: .nan", "lr: expected a finite number"),
                          ("lr: null", "lr: expected a number"),
                          ("nonsense: 1", "unknown option 'nonsense'")]:
        cfg.write_text(text + "\n")
        err = fails(["train", "--config", str(cfg), "--output-dir", str(out)], capsys, message, out)
        assert f"config file {cfg}" in err and "usage:" not in err
    # an optional field takes null (or "none" as a flag): save_every null = never checkpoint
    cfg.write_text("save_every: null\nmax_steps: none\n")
    args = parse(build_parser(), ["train", "--config", str(cfg), "--lr", "0.5"])
    assert args.save_every is None and args.max_steps is None and args.lr == 0.5
    assert args._given == {"config", "lr"}


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "bogus"], "device 'bogus' is not a torch device"),
    (["--device", "cuda:99"], "device 'cuda:99'"),
    (["--max-length", "-5"], "argument --max-length: expected an integer >= 1, got -5"),
    (["--max-train-examples", "0"], "argument --max-train-examples: expected an integer >= 1, got 0"),
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number"),
    (["--weight-decay", "-1"], "weight_decay >= 0"),
    (["--alpha", "nan"], "argument --alpha: expected a finite number"),
    (["--r", "0"], "argument --r: expected an integer >= 1"),
    (["--dropout", "1.5"], "dropout must be a number in [0, 1), got 1.5"),
    (["--target-modules", ","], "target_modules must be a non-empty list"),
    (["--batch-size", "1.5"], "argument --batch-size: invalid int value: '1.5'"),
    (["--scheduler", "sine"], "argument --scheduler: invalid choice: 'sine'"),
    (["--metric", "nosuch"], "--metric 'nosuch': the classification evaluation reports accuracy, f1, mcc"),
    (["--task", "sft", "--metric", "accuracy"], "the sft evaluation reports loss, perplexity"),
])
def test_train_flags_checked_before_anything_loads(flags, message, data, tmp_path, capsys):
    out = tmp_path / "run"
    fails(["train", "--model", str(tmp_path / "no-model"), "--data", str(data), *FAST, "--output-dir", str(out),
           *flags], capsys, message, out)


def test_train_output_dir_and_packages(data, tmp_path, capsys, monkeypatch):
    common = ["train", "--model", str(tmp_path / "no-model"), "--data", str(data), *FAST]
    file = tmp_path / "a-file"
    file.write_text("x")
    fails([*common, "--output-dir", str(file)], capsys, "exists and is not a directory")
    fails([*common, "--output-dir", str(file / "sub")], capsys, f"{file} is a file, not a directory")
    assert file.read_text() == "x"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    fails([*common, "--output-dir", str(out), "--tensorboard", "true"], capsys,
          "tensorboard=True needs the tensorboard package", out)


def test_train_refuses_a_previous_runs_directory(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    fails(["train", "--model", str(tmp_path / "no-model"), "--data", str(data), *FAST, "--output-dir", str(out)],
          capsys, f"--output-dir {out} is not empty; pass --resume {out} to continue that run or --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_model_errors_are_one_line(data, tmp_path, capsys, monkeypatch):
    common = ["train", "--data", str(data), *FAST]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    fails([*common, "--model", str(empty), "--output-dir", str(out)], capsys, "has no config.json", out)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    fails([*common, "--model", str(odd), "--output-dir", str(out)], capsys,
          "model_type 'nosuchmodel' is not known to transformers", out)

    # an unknown hub id: no retries, one line (offline mode: not even one query)
    import huggingface_hub
    import transformers

    def never(*a, **k):
        raise AssertionError("transformers was asked to load an unknown hub id")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails([*common, "--model", "nosuch-org/nosuch-model", "--output-dir", str(out)], capsys,
          "'nosuch-org/nosuch-model' is not a local directory and not in the Hugging Face cache (offline mode", out)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def unreachable(repo_id, **kw):
        calls.append(kw.get("timeout"))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    fails([*common, "--model", "nosuch-org/nosuch-model", "--output-dir", str(out)], capsys,
          "the hub cannot be asked (Name or service not known)", out)
    assert calls == [10]  # one query with a timeout, no retry loop


def test_resume_errors(data, tmp_path, capsys):
    run = tmp_path / "run"
    fails(["train", "--resume", str(run)], capsys, "no run_args.json there")
    run.mkdir()
    (run / "run_args.json").write_text("[1, 2]")
    fails(["train", "--resume", str(run)], capsys, "run_args.json must hold a mapping of option: value, found list")
    (run / "run_args.json").write_text("{not json")
    fails(["train", "--resume", str(run)], capsys, f"{run / 'run_args.json'}: not valid JSON")
    (run / "run_args.json").write_text(json.dumps({"lr": "fast"}))
    fails(["train", "--resume", str(run)], capsys, f"{run / 'run_args.json'}: lr: expected a number")
    (run / "run_args.json").write_text(json.dumps({"data": str(data), "max_steps": 2, "command": "train"}))
    fails(["train", "--resume", str(run), "--lr", "0.1"], capsys, "--lr cannot change (only --max-steps, --epochs")
    fails(["train", "--resume", str(run), "--overwrite"], capsys, "--overwrite replaces it: pass one of them")
    fails(["train", "--resume", str(run)], capsys, f"--resume {run}: no complete training checkpoint there")
    ckpt = run / "checkpoint"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"state": {"global_step": 2}, "scheduler": {"last_epoch": 2}}))
    fails(["train", "--resume", str(run), "--max-steps", "2"], capsys,
          f"--max-steps 2: the run in {run} is already at step 2; give a larger value to extend it")


def test_eval_merge_generate_check_before_running(tmp_path, capsys, monkeypatch):
    import lorakit.cli.merge
    import lorakit.models

    def never(*a, **k):
        raise AssertionError("ran before its output was checked")

    monkeypatch.setattr(lorakit.models, "load_with_adapter", never)
    monkeypatch.setattr(lorakit.cli.merge, "load_with_adapter", never)
    adapter, file = tmp_path / "adapter", tmp_path / "a-file"
    adapter.mkdir()
    file.write_text("x")
    fails(["eval", str(adapter), "--data", str(tmp_path), "--output", str(tmp_path)], capsys,
          f"--output {tmp_path} is a directory, not a file")
    fails(["eval", str(adapter), "--data", str(tmp_path), "--output", str(file / "m.json")], capsys,
          f"{file} is a file, not a directory")
    fails(["merge", str(adapter), "--out", str(file)], capsys, f"--out {file} exists and is not a directory")
    fails(["merge", str(adapter), "--out", str(file / "sub")], capsys, f"{file} is a file, not a directory")
    assert file.read_text() == "x"
    fails(["generate", "--model", "m", "--prompt", "hi", "--num-beams", "0"], capsys,
          "argument --num-beams: expected an integer >= 1, got 0")
    fails(["generate", "--model", "m", "--prompt", "hi", "--temperature", "nan"], capsys,
          "argument --temperature: expected a finite number")
    fails(["eval", str(adapter), "--batch-size", "0"], capsys, "argument --batch-size: expected an integer >= 1")


def test_warnings_are_one_line(capsys, monkeypatch):
    import warnings

    import lorakit.cli.inspect as inspect_cmd

    def run(args):
        warnings.warn("first line\nsecond line", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(inspect_cmd, "run", run)
    assert main(["inspect", "x"]) == 0
    assert capsys.readouterr().err == "lorakit: warning: first line\n"


def test_file_values_follow_each_flag_kind():
    """Flags added by any subcommand get the same treatment: switches take booleans, repeatable options lists,
    typed options their type (as on the command line)."""
    import argparse

    from lorakit.cli.options import UsageError, file_values, positive_int

    p = argparse.ArgumentParser()
    p.add_argument("--on", action=argparse.BooleanOptionalAction)
    p.add_argument("--flag", action="store_true")
    p.add_argument("--item", action="append", type=positive_int)
    p.add_argument("--names")
    values = file_values(p, {"on": True, "flag": "no", "item": [1, "2"], "names": ["q", "v"]}, "f.yaml")
    assert values == {"on": True, "flag": False, "item": [1, 2], "names": "q,v"}
    assert type(values["on"]) is bool
    for bad, message in [({"on": "maybe"}, "f.yaml: on: expected true/false"),
                         ({"flag": 1}, "f.yaml: flag: expected true/false"),
                         ({"item": [1, 0]}, "f.yaml: item: expected an integer >= 1, got 0"),
                         ({"names": [["q"]]}, "f.yaml: names: expected a single value")]:
        with pytest.raises(UsageError) as e:
            file_values(p, bad, "f.yaml")
        assert message in str(e.value)


def test_eval_and_generate_given_a_run_dir_name_its_adapters(tmp_path, capsys):
    import lorakit
    from tests.conftest import MLP

    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    lorakit.save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "run_args.json").write_text("{}")
    for argv in (["eval", str(tmp_path / "run")], ["generate", "--adapter", str(tmp_path / "run"), "--prompt", "x"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.endswith("run (adapters in its subfolders: adapter/)\n")


def test_train_imports_the_optional_packages_it_will_use_before_writing(data, tmp_path):
    """Issue 17 item 5: a tensorboard that is installed but raises on import is refused by the pre-run check, in
    one line, exit 2, nothing written (a subprocess: the broken package lives on its PYTHONPATH only)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import lorakit

    fake = tmp_path / "site" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("broken on purpose")\n')
    src = Path(lorakit.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(src)]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lorakit.cli.main", "train", "--model", str(tmp_path / "no-model"),
                           "--data", str(data), *FAST, "--output-dir", str(out), "--tensorboard", "true"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("lorakit: error: tensorboard=True needs the tensorboard package, which is installed but "
                           "fails to import (torch.utils.tensorboard: RuntimeError: broken on purpose)\n"), done.stderr
    assert not out.exists()
