"""Tests for lorakit.ops.pool: the resident stacked pool against the references.

Oracles: ``loop_update`` (each adapter on its own rows, one layer) and the whole model run one row at a
time under ``use_adapter``. Tolerance fp32 1e-5, as in test_per_row.py: same products in another order
(zero-padded ranks, scaling folded into B), rounding differences ~1e-7; a wrong slot or a stale slot
gives differences of order 1.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.model import lora_layers
from lorakit.ops.per_row import RowPlan, loop_update
from lorakit.ops.pool import AdapterPool, PoolWeights
from tests.conftest import llama, randomize_lora
from tests.ops.test_per_row import KINDS, NAMES, assert_close, layer_of, make_case, reference_rows


@pytest.mark.parametrize("kind", KINDS)
def test_pool_matches_loop_reference(kind):
    model, x = make_case(kind)
    pool = AdapterPool(model, slots=1)  # forces a growth when "b" arrives
    pool.add("a")
    pool.add("b")
    assert pool.slots == 2
    layer = layer_of(model)
    with torch.no_grad(), pool.rows(NAMES):
        got = model(x)
        if kind != "conv2d":
            assert isinstance(layer.row_plan, RowPlan) and isinstance(layer.row_plan.weights, PoolWeights)
    want, _ = reference_rows(model, x, NAMES, 1.0)
    assert_close(got, want.detach(), torch.float32, kind)
    assert layer.row_plan is None
    if kind != "conv2d":  # the layer's update alone against the one-layer oracle
        with torch.no_grad():
            index = pool.index(NAMES)
            plan = RowPlan(PoolWeights(pool.stacks[layer], index, None, False), index, False, kind == "embedding")
            assert_close(plan(x), loop_update(layer, x, NAMES), torch.float32, f"{kind} layer")


@pytest.mark.parametrize("kind", ["linear", "conv1d_sliced", "embedding"])
def test_pool_shared_rows_and_base_rows(kind):
    model, x = make_case(kind)
    pool = AdapterPool(model)
    pool.add("a")
    pool.add("b")
    shared = ["b"] * len(NAMES)
    with torch.no_grad(), pool.rows(shared):
        assert layer_of(model).row_plan.weights.shared_slot == pool.slot_of["b"]
        got = model(x)
    with torch.no_grad(), lorakit.use_adapter(model, "b"):
        want = model(x)
    assert_close(got, want, torch.float32, kind)
    with torch.no_grad(), pool.rows([None] * len(NAMES)):
        base_rows = model(x)
    with torch.no_grad(), lorakit.disabled(model):
        assert torch.equal(base_rows, model(x))


def test_slot_reuse_rewrite_and_unknown_names():
    """A removed adapter's slot is zeroed and reused; re-adding after a weight change rewrites the slot."""
    model, x = make_case("mixed_rank")
    pool = AdapterPool(model)
    pool.add("a")
    pool.add("b")
    slot_b = pool.slot_of["b"]
    pool.remove("a")
    with pytest.raises(KeyError, match=r"\['a'\] not in the pool"):
        pool.index(["a"])
    lorakit.delete_adapter(model, "a")
    cfg = lorakit.LoraConfig(r=2, alpha=4.0, target_modules=["proj"])
    lorakit.add_lora(model, cfg, adapter="c")
    randomize_lora(model, seed=3)
    assert pool.add("c") == 0 and pool.slot_of["b"] == slot_b  # c took a's freed slot
    pool.add("b")  # b's weights changed (randomize_lora): rewritten in place
    names = ["c", None, "b", "c", "b"]
    with torch.no_grad(), pool.rows(names):
        got = model(x)
    want, _ = reference_rows(model, x, names, 1.0)
    assert_close(got, want.detach(), torch.float32, "after reuse")
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        pool.add("zzz")
    with pytest.raises(ValueError, match="slots must be >= 1"):
        AdapterPool(model, slots=0)


def test_llama_generation_rows_match_each_adapter_alone():
    """Many adapters on a causal LM, a composition that changes between calls: each row equals its adapter alone."""
    torch.manual_seed(0)
    model = llama()
    names = [f"n{i}" for i in range(6)]
    for i, name in enumerate(names):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2 + i % 3, alpha=8, target_modules=["q_proj", "v_proj"]),
                         adapter=name)
    randomize_lora(model, std=0.2)
    pool = AdapterPool(model, slots=2)
    for name in names:
        pool.add(name)
    ids = torch.randint(1, 101, (4, 5), generator=torch.Generator().manual_seed(1))
    for rows in (["n0", "n5", None, "n3"], ["n2", "n2", "n4", "n1"]):
        with torch.no_grad(), pool.rows(rows):
            got = model(input_ids=ids).logits
        with torch.no_grad():
            want = []
            for i, name in enumerate(rows):
                with lorakit.use_adapter(model, name):
                    want.append(model(input_ids=ids[i:i + 1]).logits)
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    assert all(layer.row_plan is None for layer in lora_layers(model))


def test_merged_model_is_refused_and_context_restores_layers():
    model, x = make_case("linear")
    pool = AdapterPool(model)
    pool.add("a")
    lorakit.merge(model, "a")
    with pytest.raises(RuntimeError, match="needs unmerged adapters"), pool.rows(["a"] * len(NAMES)):
        pass
    lorakit.unmerge(model)
    with torch.no_grad(), pytest.raises(ValueError, match="adapter names for a batch"), pool.rows(["a"]):
        model(x)  # 1 name for 5 rows
    assert layer_of(model).row_plan is None
    with pytest.raises(KeyError, match=r"\['b'\] not in the pool"):
        pool.index(["b"])


@pytest.mark.parametrize("variant", [{"init": "olora"}, {"init": "pissa"}])
def test_base_replacing_adapters_are_refused(variant):
    """An OLoRA/PiSSA adapter changed the base the other rows read: the pool refuses it by name instead of
    computing something else, and holds nothing afterwards (DoRA runs: tests/ops/test_dora_rows.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["0"], **variant), adapter="odd")
    pool = AdapterPool(model)
    with pytest.raises(ValueError, match="adapter 'odd' .*mixed-adapter batching"):
        pool.add("odd")
    assert pool.names() == [] and not pool.stacks
