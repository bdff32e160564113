"""Checkpoint / resume: a resumed run ends bit-identical to an uninterrupted one (fp32 CPU, dropout on),
after a SIGKILL of a real run and after a crash in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import state as state_mod
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from lorakit.train.state import find_checkpoint, load_checkpoint
from tests.train.tiny_run import Crash, build, collate, make_data, run

SCRIPT = Path(__file__).with_name("tiny_run.py")
ROOT = SCRIPT.parents[2]
STEPS, EVERY = 40, 5


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {**load_file(out / "adapter" / "adapter_model.safetensors"),
            **{f"trainable.{k}": v for k, v in load_file(out / "checkpoint" / "trainable.safetensors").items()}}


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"tensors differ after resume: {bad}"


def _evals(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def _script(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--max-steps", str(STEPS), "--save-every",
                             str(EVERY), "--dropout", "0.1", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_is_bit_identical(tmp_path, one_thread):
    victim = _script(tmp_path / "victim", "--delay", "0.05")
    state_file = tmp_path / "victim" / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not state_file.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "adapter").exists()  # it really died mid-run
    killed_at = load_checkpoint(tmp_path / "victim").state.global_step
    assert 0 < killed_at < STEPS
    resumed = _script(tmp_path / "victim", "--resume")
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    run(str(tmp_path / "ref"), max_steps=STEPS, save_every=EVERY)  # uninterrupted, in this process
    _assert_identical(tmp_path / "ref", tmp_path / "victim")
    assert _evals(tmp_path / "ref") == _evals(tmp_path / "victim")


@pytest.mark.parametrize("where", ["before_swap", "between_renames"])
def test_crash_during_checkpoint_write_leaves_a_usable_checkpoint(tmp_path, monkeypatch, where, one_thread):
    run(str(tmp_path / "ref"), max_steps=20, save_every=EVERY)
    real_rename = os.rename
    renames: list[str] = []

    def flaky_rename(src, dst):
        renames.append(Path(src).name)
        # the 3rd save (step 15): crash just before its first rename, or between its two renames
        if len(renames) == {"before_swap": 4, "between_renames": 5}[where]:
            raise Crash(f"killed at rename {src} -> {dst}")
        return real_rename(src, dst)

    monkeypatch.setattr(state_mod.os, "rename", flaky_rename)
    with pytest.raises(Crash):
        run(str(tmp_path / "run"), max_steps=20, save_every=EVERY)
    monkeypatch.setattr(state_mod.os, "rename", real_rename)
    found = find_checkpoint(tmp_path / "run")
    assert found.name == {"before_swap": "checkpoint", "between_renames": "checkpoint.old"}[where]
    assert load_checkpoint(tmp_path / "run").state.global_step == 10
    assert list((tmp_path / "run").glob("checkpoint.tmp-*"))  # the half-done write is still there...
    run(str(tmp_path / "run"), max_steps=20, save_every=EVERY, resume=True)
    assert not list((tmp_path / "run").glob("checkpoint.tmp-*"))  # ...and cleaned up by the next save
    assert load_checkpoint(tmp_path / "run" / "checkpoint.old").state.global_step == 15  # the previous one, kept
    _assert_identical(tmp_path / "ref", tmp_path / "run")


def test_checkpoint_contents_load_without_pickle(tmp_path):
    run(str(tmp_path), max_steps=5, save_every=5)
    ckpt = load_checkpoint(tmp_path)  # every torch.load inside is weights_only=True
    assert ckpt.state.global_step == 5 and ckpt.state.epoch_step == 5
    assert set(ckpt.optimizer) == {"state", "param_groups"} and len(ckpt.optimizer["param_groups"]) == 2
    assert ckpt.epoch_generator.dtype == torch.uint8 and {"torch", "python"} <= set(ckpt.rng[0])
    assert ckpt.config["train"]["seed"] == 7 and ckpt.scheduler["last_epoch"] == 5
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".weight", ".bias")) for k in ckpt.trainable)


def test_resume_errors_and_warnings(tmp_path):
    data = make_data(32)
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=8, save_every=2, progress=False, plot=False)
    with pytest.raises(FileNotFoundError, match="no complete training checkpoint"):
        train(build(0.0), data, collate, cfg, resume_from=True)
    train(build(0.0), data, collate, cfg)
    changed = TrainConfig(**{**cfg.__dict__, "lr": 1.0})
    with pytest.warns(UserWarning, match="lr"):
        result = train(build(0.0), data, collate, changed, resume_from=True)
    assert result.global_step == 4  # the run had finished: nothing left to do


# ----- damaged checkpoints: fall back to the previous one, or one error naming the file ---------------------------
def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _other_rank(ckpt: Path) -> Path:
    from safetensors.torch import save_file

    file = ckpt / "trainable.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(2, tensors[key].shape[1])  # rank 2 where the model has rank 4
    save_file(tensors, file)
    return file


DAMAGE = {
    "trainable_truncated": lambda c: _truncate(c / "trainable.safetensors"),
    "rng_truncated": lambda c: _truncate(c / "rng.pt"),
    "optimizer_garbage": lambda c: (c / "optimizer.pt").write_bytes(os.urandom(300)) and c / "optimizer.pt",
    "optimizer_pickle": lambda c: torch.save({"state": {}, "param_groups": [{"params": [Crash]}]},
                                             c / "optimizer.pt") or c / "optimizer.pt",
    "other_rank": _other_rank,
    "state_not_json": lambda c: (c / "trainer_state.json").write_text("{") and c / "trainer_state.json",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs compared with it (one_thread)
    run(str(out), max_steps=4, save_every=2)
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_previous_one(damage, tmp_path, reference, one_thread):
    run(str(tmp_path), max_steps=4, save_every=2)  # checkpoint/ at step 4, checkpoint.old/ at step 2
    file = DAMAGE[damage](tmp_path / "checkpoint")
    with pytest.warns(UserWarning) as caught:
        run(str(tmp_path), max_steps=4, save_every=2, resume=True)
    notices = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(notices) == 1 and str(file) in notices[0] and "\n" not in notices[0], notices
    assert "weights_only" not in notices[0]
    _assert_identical(reference, tmp_path)  # steps 3-4 redone from step 2: the same run
    assert _evals(reference) == _evals(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.old").state.global_step == 2  # the good one was kept...
    assert (tmp_path / "checkpoint.damaged" / file.name).exists()  # ...and the damaged one set aside


@pytest.mark.parametrize("damage", ["rng_truncated", "optimizer_pickle", "state_not_json"])
def test_no_good_checkpoint_is_one_error_naming_the_file(damage, tmp_path, one_thread):
    from lorakit.core.checkpoint import CheckpointError

    run(str(tmp_path), max_steps=2, save_every=2)  # one checkpoint, no fallback
    file = DAMAGE[damage](tmp_path / "checkpoint")
    with pytest.raises(CheckpointError) as e:
        run(str(tmp_path), max_steps=2, save_every=2, resume=True)
    message = str(e.value)
    assert message.startswith(str(file)) and "\n" not in message and "weights_only" not in message, message


@pytest.mark.filterwarnings("ignore:resume")
def test_a_checkpoint_that_does_not_verify_never_replaces_the_last_good_one(tmp_path, monkeypatch, one_thread):
    run(str(tmp_path), max_steps=2, save_every=2)
    before = (tmp_path / "checkpoint" / "trainable.safetensors").read_bytes()
    real_save = state_mod.save_file

    def torn_save(tensors, path, metadata=None):  # a write that silently loses half the file
        real_save(tensors, path, metadata=metadata)
        _truncate(Path(path))

    monkeypatch.setattr(state_mod, "save_file", torn_save)
    with pytest.raises(state_mod.CheckpointError, match="trainable.safetensors"):
        run(str(tmp_path), max_steps=4, save_every=2, resume=True)
    assert load_checkpoint(tmp_path).state.global_step == 2
    assert (tmp_path / "checkpoint" / "trainable.safetensors").read_bytes() == before


def test_resume_extends_a_finished_run(tmp_path, one_thread):
    data = make_data(32)

    def config(out: Path, steps: int, scheduler: str = "constant") -> TrainConfig:
        return TrainConfig(output_dir=str(out), lr=1e-2, max_steps=steps, batch_size=8, save_every=100, seed=3,
                           scheduler=scheduler, progress=False, plot=False)

    train(build(0.1), data, collate, config(tmp_path / "ref", 6))
    train(build(0.1), data, collate, config(tmp_path / "run", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant schedule does not change: nothing to warn about
        result = train(build(0.1), data, collate, config(tmp_path / "run", 6), resume_from=True)
    assert result.global_step == 6  # past the end of the first epoch (4 steps): the data order goes on too
    _assert_identical(tmp_path / "ref", tmp_path / "run")
    train(build(0.1), data, collate, config(tmp_path / "cos", 2, "cosine"))
    with pytest.warns(UserWarning, match="now ends at step 4 instead of 2; the learning-rate schedule is stretched"):
        train(build(0.1), data, collate, config(tmp_path / "cos", 4, "cosine"), resume_from=True)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch, one_thread):
    """The resume's rewrite of metrics.jsonl (records past the checkpoint dropped) goes through a temp file and
    a rename: killed before the rename, the old file is still whole."""
    run(str(tmp_path), max_steps=4, save_every=2)
    (tmp_path / "checkpoint").rename(tmp_path / "gone")  # resume from checkpoint.old/ (step 2): records to drop
    old = (tmp_path / "metrics.jsonl").read_text()

    def killed(src, dst):
        raise Crash(f"killed before renaming {src}")

    monkeypatch.setattr(state_mod.os, "replace", killed)
    with pytest.raises(Crash, match="metrics.jsonl"):
        run(str(tmp_path), max_steps=4, save_every=2, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == old
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # the temp file is removed


def test_a_nan_metric_is_never_the_best_and_the_run_stays_resumable(tmp_path, one_thread):
    values = iter([float("nan"), 0.3])
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=8, max_steps=4, eval_every=2, save_every=4,
                      progress=False, plot=False)
    result = train(build(0.0), make_data(32), collate, cfg, evaluate=lambda m: {"accuracy": next(values)})
    assert (result.best_metric, result.best_step) == (0.3, 4)
    assert load_checkpoint(tmp_path).state.best_metric == 0.3  # trainer_state.json holds no NaN to refuse later


def test_load_trainable_checks_every_shape_before_copying():
    from lorakit.train import distributed as D

    model = build(0.0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    tensors = {n: torch.ones_like(p) for n, p in params.items()}
    last = list(tensors)[-1]
    tensors[last] = torch.ones(1, *params[last].shape[1:])  # would broadcast silently into copy_
    with pytest.raises(ValueError, match=f"{last} has shape"):
        D.load_trainable(model, tensors)
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # nothing copied


def test_a_damaged_checkpoint_is_reported_by_lorakits_notice_alone(tmp_path, one_thread):
    """Issue 17 item 2: torch's own warnings while reading a damaged optimizer.pt ("Detected pickle protocol 4 ...
    please file an issue") never reach the user; lorakit's fallback notice is the only thing printed."""
    import pickle

    import lorakit

    run(str(tmp_path), max_steps=4, save_every=2)  # checkpoint/ at step 4, checkpoint.old/ at step 2
    damaged = tmp_path / "checkpoint" / "optimizer.pt"
    damaged.write_bytes(pickle.dumps({"state": 1}, protocol=4))  # torch.load warns about the protocol, then fails
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(lorakit.__file__).parents[1]), str(ROOT)])}
    done = subprocess.run([sys.executable, "-W", "default", str(SCRIPT), str(tmp_path), "--max-steps", "4",
                           "--save-every", "2", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "Warning: " in line]
    assert len(warned) == 1, done.stderr  # python prints a warning as its line and the line of code that warned
    assert f"UserWarning: resume: {damaged}: not a readable checkpoint file" in warned[0], warned
    assert "falling back to the previous checkpoint" in warned[0]
    assert "protocol" not in done.stderr and "file an issue" not in done.stderr and done.stdout == "", done.stderr
    assert load_checkpoint(tmp_path).state.global_step == 4  # steps 3-4 redone from checkpoint.old/
