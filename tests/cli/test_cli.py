"""The ``lorakit`` command line on tiny saved models: train, eval, merge, inspect, generate, bad input."""

import json
import os
import shutil
import stat

import pytest
import torch

from lorakit.cli.main import main
from tests.cli.conftest import FAST


def test_help_for_every_command(capsys):
    for cmd in ("train", "eval", "merge", "inspect", "generate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: lorakit " + cmd in capsys.readouterr().out


def test_train_classification_then_inspect_and_merge(bert_dir, cls_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.chdir(cls_data.parent)  # --data given relative to here; eval below runs elsewhere
    rc = main(["train", "--model", str(bert_dir), "--data", cls_data.name, "--output-dir", str(out), *FAST])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "trainable" in text and "dev before" in text and "dev after" in text
    for f in ("adapter/adapter_model.safetensors", "best/adapter_config.json", "metrics.jsonl",
              "training_curves.png", "run_args.json"):
        assert (out / f).exists(), f
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(out / "adapter")]) == 0  # no --data: the run's own dev split
    after = text.split("dev after")[1].split()
    assert capsys.readouterr().out.split()[:2] == after[:2]  # "accuracy 0.xxxx", as the run printed it
    assert main(["inspect", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {layer["rank"] for layer in info["layers"]} == {8}
    assert len(info["layers"]) == 4  # query, value x 2 layers
    assert info["config"]["modules_to_save"] == ["classifier"]

    none = tmp_path / "none"  # --modules-to-save none trains no head (it fell back to the classifier before)
    assert main(["train", "--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(none), *FAST,
                 "--modules-to-save", "none"]) == 0
    assert json.loads((none / "adapter" / "adapter_config.json").read_text())["modules_to_save"] is None
    capsys.readouterr()

    merged = tmp_path / "merged"
    umask = os.umask(0o022)
    try:
        assert main(["merge", str(out / "adapter"), "--out", str(merged)]) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o755  # not a private temp dir's 0700
    assert stat.S_IMODE((out / "run_args.json").stat().st_mode) == 0o666 & ~umask  # written atomically, not 0600
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.models import load_with_adapter

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not any("lorakit" in type(m).__module__ for m in plain.modules())
    adapted, _, _ = load_with_adapter(out / "adapter")
    batch = AutoTokenizer.from_pretrained(merged)(["good movie .", "awful movie ."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
    assert main(["merge", str(out / "adapter"), "--out", str(merged)]) == 2  # exists: refuses without --force


def test_class_names_travel_with_the_adapter(bert_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    words = {"good": "pos", "bad": "neg", "fine": "neutral"}
    rows = ["sentence\tlabel"] + [f"{w} movie .\t{label}" for w, label in words.items()] * 8
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(data), "--output-dir", str(out), *FAST]) == 0
    from lorakit.core.checkpoint import read_adapter  # lorakit's metadata is in the weights file's header

    assert read_adapter(out / "adapter")[1]["lorakit"]["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}

    from lorakit.models import load_with_adapter
    from lorakit.train.evaluate import evaluate_classification
    from lorakit.train.tasks import load_task_data

    model, tok, _ = load_with_adapter(out / "adapter")
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    # A dev file without "neg": its labels must still map to the training ids (neutral=1, pos=2), not 0/1.
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\n" + "".join(f"{w} movie .\t{words[w]}\n" for w in ("good", "fine") * 3))
    expected = evaluate_classification(model, load_task_data(dev, "classification", tok,
                                                              label_names=["neg", "neutral", "pos"]).examples,
                                       tok.pad_token_id)
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--data", str(dev)]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(printed["accuracy"]) == pytest.approx(expected["accuracy"], abs=1e-4)
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}


def test_yaml_config_and_flags_win(bert_dir, cls_data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {bert_dir}\ndata: {cls_data}\nr: 2\nmax-steps: 2\nprogress: false\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--r", "3", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    main(["inspect", str(out / "adapter"), "--json"])
    assert {layer["rank"] for layer in json.loads(capsys.readouterr().out)["layers"]} == {3}
    saved = json.loads((out / "run_args.json").read_text())
    assert saved["max_steps"] == 2 and saved["r"] == 3
    cfg.write_text("nonsense_option: 1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option 'nonsense_option'" in capsys.readouterr().err


def test_train_e2e_then_eval_with_paper_metrics(gpt2_dir, e2e_data, tmp_path, capsys):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("pycocoevalcap")
    out = tmp_path / "run"
    assert main(["train", "--model", str(gpt2_dir), "--data", str(e2e_data), "--task", "e2e",
                 "--target-modules", "c_attn", "--output-dir", str(out), *FAST]) == 0
    assert "dev after    loss" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", str(out / "adapter"), "--data", str(e2e_data), "--task", "e2e", "--num-beams", "2",
                 "--max-new-tokens", "8", "--output", str(report)]) == 0
    result = json.loads(report.read_text())
    assert set(result["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert len(result["hypotheses"]) == 2  # two distinct MRs in valid


def test_generate_per_row_adapters_equals_one_adapter_each(gpt2_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import lorakit
    from tests.conftest import randomize_lora

    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["c_attn"],
                                                   base_model_name_or_path=str(gpt2_dir), task_type="CAUSAL_LM"))
        randomize_lora(model, seed=seed, std=1.0)
        paths[name] = lorakit.save_adapter(model, tmp_path / name)
    prompts = ["the cat sat", "a dog ran", "what is two"]
    common = ["--max-new-tokens", "5"] + [x for p in prompts for x in ("--prompt", p)]
    assert main(["generate", "--adapter", f"a={paths['a']}", "--adapter", f"b={paths['b']}",
                 "--row-adapters", "a,b,none", *common]) == 0
    mixed = capsys.readouterr().out.splitlines()
    singles = {}
    for name in ("a", "b"):
        assert main(["generate", "--adapter", f"{name}={paths[name]}", *common]) == 0
        singles[name] = capsys.readouterr().out.splitlines()
    assert main(["generate", "--model", str(gpt2_dir), *common]) == 0
    base = capsys.readouterr().out.splitlines()
    assert mixed == [singles["a"][0], singles["b"][1], base[2]]
    assert singles["a"] != singles["b"]


def _bad(args, tmp_path, capsys, message):
    out = tmp_path / "never"
    rc = main(["train", *args, "--output-dir", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lorakit: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()  # nothing written


def test_bad_input_exit_2_one_line_nothing_written(bert_dir, cls_data, tmp_path, capsys):
    model = ["--model", str(bert_dir)]
    _bad([*model, "--data", str(tmp_path / "missing.tsv")], tmp_path, capsys, "missing.tsv")
    _bad(["--model", str(tmp_path / "no-model"), "--data", str(cls_data)], tmp_path, capsys, "does not exist")
    _bad([*model, "--data", str(cls_data), "--target-modules", "q_proj"], tmp_path, capsys,
         "no module matches target_modules")
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.tsv").write_text("text\tlabel\n")
    _bad([*model, "--data", str(d / "train.tsv")], tmp_path, capsys, "empty")
    (d / "train.tsv").write_text("words\tlabel\nfine\t1\n")
    _bad([*model, "--data", str(d / "train.tsv")], tmp_path, capsys, "column")
    (d / "train.tsv").write_bytes(b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n")
    _bad([*model, "--data", str(d / "train.tsv")], tmp_path, capsys, "UTF-8")
    (d / "train.tsv").write_text("sentence\tlabel\nok\t1\nfine\t0\n")
    (d / "dev.tsv").write_text("sentence\tlabel\nok\t7\n")
    _bad([*model, "--data", str(d)], tmp_path, capsys, "label")
    shutil.copytree(bert_dir, tmp_path / "bad-model")
    config = json.loads((tmp_path / "bad-model" / "config.json").read_text())
    (tmp_path / "bad-model" / "config.json").write_text(json.dumps(config | {"intermediate_size": 41}))
    _bad(["--model", str(tmp_path / "bad-model"), "--data", str(cls_data)], tmp_path, capsys,
         "layer.0.intermediate.dense.bias has shape (37,) in the checkpoint, the model expects (41,)")


def test_run_directory_lifecycle(bert_dir, cls_data, tmp_path, capsys, monkeypatch, one_thread):
    """A second train into a run's directory is refused; --resume falls back past a damaged checkpoint with a
    one-line notice and --max-steps extends the run; eval --output is written atomically; --overwrite
    replaces the run's outputs and nothing else."""
    out = tmp_path / "run"
    common = ["--model", str(bert_dir), "--data", str(cls_data), "--output-dir", str(out), *FAST, "--plot", "false"]
    assert main(["train", *common, "--max-steps", "2", "--save-every", "1"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--max-steps", "2"]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err

    torch.save({"state": {}, "param_groups": [{"params": [shutil.Error]}]}, out / "checkpoint" / "optimizer.pt")
    assert main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("lorakit: warning: resume: ") for line in err), err
    assert any(f"{out / 'checkpoint' / 'optimizer.pt'}: not a readable checkpoint file" in line
               and "falling back to the previous checkpoint" in line for line in err), err
    assert not any("weights_only" in line for line in err)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # train 1 kept; train 2 and the eval at 2 redone from step 1 (now without eval)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["state"]["global_step"] == 3

    import lorakit.train.state

    written = []
    real = lorakit.train.state.write_text_atomic
    monkeypatch.setattr(lorakit.train.state, "write_text_atomic", lambda p, t: written.append(p) or real(p, t))
    report = tmp_path / "reports" / "eval.json"
    assert main(["eval", str(out / "adapter"), "--output", str(report)]) == 0
    assert written == [report] and set(json.loads(report.read_text())["metrics"]) == {"accuracy", "f1", "mcc"}

    (out / "notes.txt").write_text("mine")
    assert main(["train", *common, "--max-steps", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "best", "checkpoint", "metrics.jsonl", "notes.txt",
                                                     "run_args.json"]  # no checkpoint.old/.damaged of the last run
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]


def test_eval_and_generate_malformed_adapter_config_one_line(gpt2_dir, e2e_data, tmp_path, capsys):
    """The core's checkpoint errors reach eval and generate as one line naming the file (merge and inspect:
    tests/cli/test_bad_checkpoints.py)."""
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"], base_model_name_or_path=str(gpt2_dir),
                                               task_type="CAUSAL_LM"))
    good = json.loads((lorakit.save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    capsys.readouterr()  # transformers' loading bar above
    for change, message in [({"rank_pattern": [1]}, "rank_pattern must be a mapping"),
                            ({"r": True}, "r must be a positive integer, got True"),
                            ({"r": 10**12}, "gives rank 1000000000000")]:
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(good | change))
        for argv in (["eval", str(tmp_path / "a"), "--data", str(e2e_data), "--task", "sft"],
                     ["generate", "--adapter", str(tmp_path / "a"), "--prompt", "hi"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and message in err, err
            assert str(tmp_path / "a") in err


def test_train_slices_and_label_smoothing_as_in_the_papers_gpt2_runs(gpt2_dir, e2e_data, tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--model", str(gpt2_dir), "--data", str(e2e_data), "--task", "e2e", "--target-modules",
                 "c_attn", "--slices", "c_attn=1,0,1", "--r", "4", "--label-smoothing", "0.1",  # the paper's GPT-2 setting
                 "--output-dir", str(out), *FAST]) == 0
    capsys.readouterr()
    from lorakit.core.checkpoint import read_adapter

    config, raw, tensors = read_adapter(out / "adapter")
    assert raw["lorakit"]["slices"] == {"c_attn": [True, False, True]}
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]  # saved as plain LoRA of rank 2r
    assert b.shape == (96, 8) and b[32:64].abs().sum() == 0  # k's rows (32..63 of q|k|v) get no update
    saved = json.loads((out / "run_args.json").read_text())  # what --resume re-reads
    assert saved["slices"] == ["c_attn=1,0,1"] and saved["label_smoothing"] == 0.1
    for bad, message in [("c_attn=1,2", "expected MODULE=MASK"), ("c_attn", "expected MODULE=MASK"),
                         ("c_attn=0,0", "at least one 1")]:
        assert main(["train", "--model", str(gpt2_dir), "--slices", bad, "--output-dir", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--model", str(gpt2_dir), "--slices", "c_attn=1,0,1", "--slices", "c_attn=1,1,0",
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "--slices names 'c_attn' twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    import lorakit.train.evaluate
    from lorakit.train.tasks import e2e_prompt_ids

    seen = []
    real = lorakit.train.evaluate.generate_texts
    monkeypatch.setattr(lorakit.train.evaluate, "generate_texts",
                        lambda m, tok, prompts, *a, **k: seen.append(prompts) or real(m, tok, prompts, *a, **k))
    mr = "name : The Vaults | Type : pub"
    for extra in ([], ["--prompt-format", "raw"]):
        assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", mr, "--max-new-tokens", "2",
                     *extra]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    assert seen == [[e2e_prompt_ids(mr, tok)], [tok(mr)["input_ids"]]]  # default: the run's task (e2e), as trained
