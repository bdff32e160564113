"""Hot-swapping under torch.compile: compile once, swap five adapters of ranks 4, 8 and 16 with varied alphas
(and rsLoRA), count dynamo's recompilations (0) and compare every output with the eager model.

Backend: ``eager`` runs dynamo's capture and guards (what decides recompilation) without inductor's C++ code
generation, which takes minutes on the 2-core CI machine; the recompilation count is the same for every backend
(guards are dynamo's). The control test shows the count can fail: an unprepared model (scaling a Python float)
recompiles on a new alpha. Tolerance: fp32, the compiled and eager graphs compute the same products; 1e-5 covers
any reordering.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.checkpoint import read_adapter
from lorakit.hotswap import HotswapAdapter

FP32 = {"atol": 1e-5, "rtol": 1e-5}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.q = nn.Linear(32, 32)
        self.v = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(torch.relu(self.q(h)) + self.v(h)).mean(1)


TARGETS = ["emb", "q", "v"]


def base():
    torch.manual_seed(0)
    return Net().eval()


def adapter_dir(tmp_path, i, r, alpha, rslora=False):
    """A saved adapter with random non-zero A and B of rank ``r``."""
    model = lorakit.add_lora(base(), lorakit.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=TARGETS))
    g = torch.Generator().manual_seed(10 + i)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return lorakit.save_adapter(model, tmp_path / f"a{i}")


def eager_output(path, x):
    model = base()
    lorakit.load_adapter(model, path)
    with torch.no_grad():
        return model(x)


def test_compiled_model_swaps_five_adapters_without_recompiling(tmp_path):
    dynamo = pytest.importorskip("torch._dynamo")
    swaps = [(4, 8.0, False), (16, 3.0, False), (8, 32.0, True), (4, 1.5, False), (16, 16.0, True)]
    paths = [adapter_dir(tmp_path, i, *s) for i, s in enumerate([(8, 16.0)] + swaps)]
    x = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    model = base()
    lorakit.load_adapter(model, paths[0])
    lorakit.prepare_for_hotswap(model, max_rank=16)
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager_output(paths[0], x), **FP32)
        frames = dict(dynamo.utils.counters["frames"])
        with dynamo.config.patch(error_on_recompile=True):
            for path, (r, _, _) in zip(paths[1:], swaps, strict=True):
                lorakit.hotswap_adapter(compiled, path)
                out = compiled(x)
                torch.testing.assert_close(out, eager_output(path, x), **FP32)
                assert model.q.adapters["default"].live_rank == r
    assert dict(dynamo.utils.counters["frames"]) == frames  # no frame compiled again
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert dynamo.utils.counters["recompiles"] == {}
    torch.testing.assert_close(torch.tensor(model.q.adapters["default"].scaling), torch.tensor(16.0 / 4))
    lorakit.hotswap_adapter(model, paths[1])  # rank 4 in the rank-16 tensors
    back = tmp_path / "back"  # the swapped-in adapter saves as itself: rank 4 (no padding), its own alpha
    lorakit.save_adapter(model, back)
    saved = read_adapter(back)[0]
    assert (saved.r, saved.alpha) == (4, 8.0)  # load_adapter checks the file's A has that rank
    torch.testing.assert_close(eager_output(back, x), eager_output(paths[1], x), **FP32)


def test_unprepared_swaps_equal_ranks_recompiling_on_a_new_alpha(tmp_path):
    dynamo = pytest.importorskip("torch._dynamo")
    model = base()
    lorakit.load_adapter(model, adapter_dir(tmp_path, 0, 8, 16.0))
    x = torch.randint(0, 50, (3, 7))
    same = adapter_dir(tmp_path, 1, 8, 4.0)
    dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x)
        lorakit.hotswap_adapter(compiled, same)
        with dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
            compiled(x)  # the control: alpha / r is a Python float here, guarded by the compiled graph
    torch.testing.assert_close(model(x), eager_output(same, x), **FP32)
    with pytest.raises(ValueError, match=r"has rank 4 at emb, which needs rank 8 \(or prepare_for_hotswap"):
        lorakit.hotswap_adapter(model, adapter_dir(tmp_path, 2, 4, 4.0))
    torch.testing.assert_close(model(x), eager_output(same, x), **FP32)  # untouched


def test_everything_is_checked_before_a_weight_changes(tmp_path):
    model = base()
    lorakit.load_adapter(model, adapter_dir(tmp_path, 0, 8, 16.0))
    with pytest.raises(ValueError, match=r"emb has rank 8 > max_rank 4"):
        lorakit.prepare_for_hotswap(model, max_rank=4)
    assert not isinstance(model.q.adapters["default"], HotswapAdapter)
    lorakit.prepare_for_hotswap(model, max_rank=8)
    x = torch.randint(0, 50, (3, 7))
    before = model(x)
    with pytest.raises(ValueError, match=r"has rank 16 at emb, which needs at most the prepared rank 8"):
        lorakit.hotswap_adapter(model, adapter_dir(tmp_path, 1, 16, 16.0))
    other = lorakit.add_lora(base(), lorakit.LoraConfig(r=4, target_modules=["q", "out"]))
    other_dir = lorakit.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"adapts other layers than adapter 'default'; not adapted now: \['out'\]"):
        lorakit.hotswap_adapter(model, other_dir)
    bad = lorakit.add_lora(base(), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        bad.v.adapters["default"].lora_B.weight[0, 0] = float("inf")
    state = lorakit.lora_state_dict(bad)
    with pytest.raises(ValueError, match="non-finite values at v"):
        lorakit.hotswap_adapter(model, (lorakit.adapter_config(bad), state))
    with pytest.raises(TypeError, match=r"takes an adapter directory or \(LoraConfig"):
        lorakit.hotswap_adapter(model, state)  # the tensors without their config
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        lorakit.hotswap_adapter(model, other_dir, adapter="x")
    assert torch.equal(model(x), before)
    lorakit.merge(model)
    with pytest.raises(RuntimeError, match="'default' is merged or inside per_row_adapters"):
        lorakit.hotswap_adapter(model, adapter_dir(tmp_path, 3, 4, 4.0))
    lorakit.unmerge(model)
    torch.testing.assert_close(model(x), before, **FP32)
    dora = lorakit.add_lora(base(), lorakit.LoraConfig(r=4, target_modules=["q"], use_dora=True))
    with pytest.raises(ValueError, match="is a DoraAdapter at q, not a plain"):
        lorakit.prepare_for_hotswap(dora, max_rank=8)
