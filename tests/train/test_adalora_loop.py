"""AdaLoRA in the training loop: the allocator as a step hook (regulariser in the loss, ranks allocated
after each optimizer step) and an exact resume with its importance scores in the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.train.config import TrainConfig
from lorakit.train.loop import HOOK_FILE, train
from tests.train.tiny_run import Crash, TinyNet, collate, make_data

STEPS = 12


def _run(out, crash_at_eval: int = 0, resume: bool = False):
    torch.manual_seed(0)
    model = TinyNet()
    lorakit.add_lora(model, lorakit.AdaLoraConfig(r=4, alpha=4, target_modules=["0", "1"], modules_to_save=["head"]))
    alloc = lorakit.AdaLoraAllocator(model, target_rank=2, total_steps=STEPS, tinit=2, tfinal=3, delta_t=2)
    calls = []

    def evaluate(m: nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == crash_at_eval:
            raise Crash("crash")
        return {"accuracy": 0.0}

    cfg = TrainConfig(output_dir=str(out), lr=1e-2, max_steps=STEPS, batch_size=16, seed=3, eval_every=4,
                      save_every=4, progress=False, plot=False)
    train(model, make_data(64), collate, cfg, evaluate=evaluate, resume_from=True if resume else None,
          step_hook=alloc)
    return model, alloc


def test_loop_runs_the_allocator_and_a_resume_restores_its_state_exactly(tmp_path):
    _, alloc = _run(tmp_path / "ref")
    assert alloc.last_step == STEPS and alloc.final
    assert sum(alloc.rank_pattern().values()) == 4  # target_rank 2 x 2 layers
    cfg = json.loads((tmp_path / "ref" / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {p: max(n, 1) for p, n in alloc.rank_pattern().items()}
    with pytest.raises(Crash):
        _run(tmp_path / "resumed", crash_at_eval=2)  # dies at step 8, after the step-8 checkpoint
    _, alloc = _run(tmp_path / "resumed", resume=True)
    assert alloc.last_step == STEPS
    ref, resumed = (load_file(p / "checkpoint" / "trainable.safetensors") for p in (tmp_path / "ref",
                                                                                    tmp_path / "resumed"))
    assert sorted(ref) == sorted(resumed)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "a resumed AdaLoRA run differs from the uninterrupted one"


def test_resume_without_the_hook_state_is_refused(tmp_path):
    with pytest.raises(Crash):
        _run(tmp_path, crash_at_eval=2)
    (tmp_path / "checkpoint" / HOOK_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {HOOK_FILE}"):
        _run(tmp_path, resume=True)
