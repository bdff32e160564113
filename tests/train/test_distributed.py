"""Distributed training under torchrun on 2 CPU processes (gloo): DDP and FSDP2 match a single process
with the same global batch, only rank 0 writes, and DDP / FSDP runs resume bit-identically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.train import distributed as D
from tests.train.tiny_run import run

SCRIPT = Path(__file__).with_name("tiny_run.py")
ROOT = SCRIPT.parents[2]
ARGS = ["--dropout", "0", "--max-steps", "20", "--save-every", "10"]
TOL = 1e-5  # DDP / FSDP average gradients across ranks: same math as one process, summed in another order


def _torchrun(out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(out), "--dist-suite", *ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """single/ in process; in one torchrun launch ddp/, fsdp_full/, and ddp_resumed/ and fsdp/ (each crashed
    at its 2nd eval, then resumed on a fresh model from what is on disk)."""
    root = tmp_path_factory.mktemp("dist")
    _torchrun(root)
    run(str(root / "single"), dropout=0.0, max_steps=20, save_every=10)
    return root


@pytest.mark.parametrize("engine", ["ddp", "fsdp_full"])
def test_torchrun_matches_single_process(runs, engine):
    single, dist_run = _adapter(runs / "single"), _adapter(runs / engine)
    assert sorted(single) == sorted(dist_run)
    for k in single:
        torch.testing.assert_close(dist_run[k], single[k], rtol=0, atol=TOL, msg=k)
    assert any(v.abs().sum() > 0 for k, v in single.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("engine", ["ddp", "fsdp_full"])
def test_only_rank0_writes(runs, engine):
    records = [json.loads(x) for x in (runs / engine / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [5, 10, 15, 20]
    assert sorted(p.name for p in (runs / engine).iterdir()) == ["adapter", "best", "checkpoint", "checkpoint.old",
                                                                 "metrics.jsonl"]
    state = json.loads((runs / engine / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["world_size"] == 2


@pytest.mark.parametrize(("full", "crashed"), [("ddp", "ddp_resumed"), ("fsdp_full", "fsdp")])
def test_resume_under_torchrun_is_bit_identical(runs, full, crashed):
    evals = [json.loads(x) for x in (runs / crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [10, 20]  # crashed at the step-20 eval, redone
    full, resumed = _adapter(runs / full), _adapter(runs / crashed)
    assert sorted(full) == sorted(resumed)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_single_process_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, info) is model and D.unwrap(model) is model
    assert D.shard([1, 2, 3, 4, 5], info) == [1, 2, 3, 4, 5]
    two = D.DistInfo(rank=1, world_size=2)
    assert D.shard([1, 2, 3, 4, 5], two) == [3, 4]  # ragged tail trimmed: both ranks get 2
    assert D.broadcast_object({"a": 1}, info) == {"a": 1} and D.gather_objects(3, info) == [3]
    assert not D.is_sharded(model)
