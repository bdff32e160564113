"""LoraTrainer under torchrun --nproc_per_node=2 (DDP, gloo on CPU): one adapter, written by rank 0, equal
to the single-process one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integrations.helpers import adapter_tensors, files
from tests.integrations.trainer_run import run

pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("trainer_run.py")
ROOT = SCRIPT.parents[2]
TOL = 1e-5  # DDP averages the two ranks' mean gradients: the same sum as one process, in another order


def test_torchrun_saves_the_single_process_adapter(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run(str(tmp_path / "single"))
    single, ddp = adapter_tensors(tmp_path / "single" / "adapter"), adapter_tensors(tmp_path / "ddp" / "adapter")
    assert sorted(single) == sorted(ddp)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=TOL, msg=k)
    assert all(single[k].abs().sum() > 0 for k in single if "lora_B" in k)  # it trained
    # the same files from one writer: the step-2 checkpoint, the final one and the save_model dir
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["adapter", "checkpoint-2", "checkpoint-3"]
    one_writer = {n.replace("rng_state.pth", "rng_state_0.pth") for n in files(tmp_path / "single" / "checkpoint-3")}
    assert set(files(tmp_path / "ddp" / "checkpoint-3")) == one_writer | {"rng_state_1.pth"}  # RNG: one per rank
