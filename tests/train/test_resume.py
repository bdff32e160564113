"""Checkpoint / resume: a resumed run ends bit-identical to an uninterrupted one (fp32 CPU, dropout on),
after a SIGKILL of a real run and after a crash in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


@pytest.fixture
def one_thread():
    """Same thread count as the subprocess runs; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
