"""transformers.Trainer over a lorakit BERT classifier: what a plain Trainer does, and LoraTrainer's
adapter checkpoints, reload (lorakit and PEFT), resume, best-model restore, save_model and
gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.integrations import LoraTrainer, restore_adapters
from tests.integrations.helpers import (
    LORA,
    adapter_tensors,
    args,
    bert_base,
    bert_lora,
    files,
    full_model_bytes,
    probe,
    records,
)

CHECKPOINT_FILES = ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
                    "scheduler.pt", "trainer_state.json", "training_args.bin"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One LoraTrainer run of 4 steps with checkpoints at steps 2 and 4; the trained model and its dir."""
    out = tmp_path_factory.mktemp("trainer")
    model = bert_lora()
    LoraTrainer(model=model, args=args(out), train_dataset=records()).train()
    return model.eval(), out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe()).logits


def test_plain_trainer_stops_at_its_first_save_and_writes_no_model(tmp_path):
    from transformers import Trainer

    with pytest.raises(RuntimeError, match=r"save_pretrained would write lorakit's wrapped layers.*"
                                           r"lorakit\.save_adapter.*unload\(model, merge=True\).*LoraTrainer"):
        Trainer(model=bert_lora(), args=args(tmp_path), train_dataset=records()).train()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # checkpoint-2/ exists but is empty


def test_checkpoints_hold_the_adapter_not_the_model(run):
    model, out = run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        listing = files(out / f"checkpoint-{step}")
        assert sorted(listing) == CHECKPOINT_FILES
        # a full-model save writes at least every base parameter: the whole checkpoint is smaller than that
        assert sum(listing.values()) < full_model_bytes(bert_base())
        assert listing["adapter_model.safetensors"] < full_model_bytes(bert_base()) / 10
    cfg = json.loads((out / "checkpoint-4" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["modules_to_save"]) == ("LORA", 4, ["classifier"])
    ck4 = adapter_tensors(out / "checkpoint-4")
    assert ck4.keys() == lorakit.lora_state_dict(model).keys()
    assert all(torch.equal(ck4[k], v) for k, v in lorakit.lora_state_dict(model).items())  # the final weights
    assert any(not torch.equal(v, adapter_tensors(out / "checkpoint-2")[k]) for k, v in ck4.items())


def test_checkpoint_reloads_in_lorakit_and_peft_with_the_same_outputs(run):
    peft = pytest.importorskip("peft")
    model, out = run
    expected = logits(model)
    fresh = bert_base(0)
    torch.manual_seed(123)  # the adapter's own init must not matter
    lorakit.load_adapter(fresh, out / "checkpoint-4")
    torch.testing.assert_close(logits(fresh.eval()), expected, atol=1e-6, rtol=1e-6)  # same ops, same order
    peft_model = peft.PeftModel.from_pretrained(bert_base(0), out / "checkpoint-4").eval()
    # PEFT adds the LoRA term in its own order: fp32 rounding, ~1e-7 relative at these sizes
    torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(bert_base(0).eval()), expected, atol=1e-3)  # training changed the output


def test_resume_gives_the_uninterrupted_adapter(run, tmp_path):
    model, out = run
    resumed = bert_lora(seed=5)  # another adapter init: the checkpoint's weights must replace it
    LoraTrainer(model=resumed, args=args(tmp_path), train_dataset=records()).train(
        resume_from_checkpoint=str(out / "checkpoint-2"))
    full, again = lorakit.lora_state_dict(model), lorakit.lora_state_dict(resumed)
    # Trainer restores optimizer, scheduler, RNG and data position; on CPU the steps repeat bit for bit
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    scores = iter([1.0, 0.0])  # the step-2 evaluation is the best one
    model = lorakit.add_lora(bert_base(0), lorakit.LoraConfig(r=2, target_modules=["query"]), adapter="other")
    lorakit.add_lora(model, lorakit.LoraConfig(**LORA))  # "default": active and trained; "other" frozen
    other_before = lorakit.lora_state_dict(model, "other")
    trainer = LoraTrainer(
        model=model, train_dataset=records(), eval_dataset=records(4, seed=2),
        compute_metrics=lambda _: {"score": next(scores)},
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                  metric_for_best_model="score", greater_is_better=True))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert sorted(files(tmp_path / "checkpoint-2")) == sorted(
        [*CHECKPOINT_FILES, "other/adapter_config.json", "other/adapter_model.safetensors"])
    best, last = adapter_tensors(tmp_path / "checkpoint-2"), adapter_tensors(tmp_path / "checkpoint-4")
    now = lorakit.lora_state_dict(model)
    assert all(torch.equal(now[k], best[k]) for k in best)
    assert any(not torch.equal(now[k], last[k]) for k in last)
    assert all(torch.equal(v, other_before[k]) for k, v in lorakit.lora_state_dict(model, "other").items())
    assert lorakit.active_adapter(model) == "default" and lorakit.adapter_names(model) == ["other", "default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n or ".copies.default." in n for n in trainable)


def test_save_model_writes_the_adapter(run, tmp_path):
    model, _ = run
    trainer = LoraTrainer(model=model, args=args(tmp_path / "unused"))
    trainer.save_model(str(tmp_path / "final"))
    assert sorted(files(tmp_path / "final")) == ["adapter_config.json", "adapter_model.safetensors",
                                                 "training_args.bin"]
    fresh = bert_base(0)
    lorakit.load_adapter(fresh, tmp_path / "final")
    torch.testing.assert_close(logits(fresh.eval()), logits(model), atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_with_frozen_embeddings(run, tmp_path):
    model, _ = run
    checkpointed = bert_lora()
    assert not checkpointed.bert.embeddings.word_embeddings.weight.requires_grad
    calls = []
    checkpointed.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: calls.append(1))
    LoraTrainer(model=checkpointed, train_dataset=records(),
                args=args(tmp_path, save_strategy="no", gradient_checkpointing=True,
                          # re-entrant: the case that needs an input requiring grad when embeddings are frozen
                          gradient_checkpointing_kwargs={"use_reentrant": True})).train()
    assert len(calls) == 2 * 4  # 4 steps, each layer run forward and again in backward: checkpointing is on
    plain, recomputed = lorakit.lora_state_dict(model), lorakit.lora_state_dict(checkpointed)
    # the recomputed forward is the same math: equal to the run without checkpointing within fp32 rounding
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)
    assert all(recomputed[k].abs().sum() > 0 for k in recomputed if "lora_B" in k)  # every layer trained


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            lorakit.adapter_names(model), lorakit.active_adapter(model))


def _assert_unchanged(model, snapshot):
    state, flags, names, active = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert (lorakit.adapter_names(model), lorakit.active_adapter(model)) == (names, active)


@pytest.mark.parametrize(("saved", "model_has", "message"), [
    ({}, {"r": 8}, "does not match the model's: .*shapes"),
    ({}, {"alpha": 16}, "does not match the model's: .*scaling"),
    ({"target_modules": ["query"]}, {}, "does not match the model's: .*value: not in the checkpoint"),
    ({}, {"target_modules": ["query"]}, "keys do not match the model; unexpected"),
])
def test_restore_refuses_another_adapter_and_changes_nothing(tmp_path, saved, model_has, message):
    source = bert_lora(bias="lora_only", **saved)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5) if p.requires_grad else None  # B, trained biases and the head differ from init
    lorakit.save_adapter(source, tmp_path)
    model = bert_lora(seed=1, bias="lora_only", **model_has)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        restore_adapters(model, tmp_path)
    _assert_unchanged(model, before)  # the biases load_adapter wrote into the base are put back too


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_restore_copies_adapter_head_and_trained_biases_in_place(tmp_path, bias):
    source = bert_lora(bias=bias)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.rand_like(p)) if p.requires_grad else None
    lorakit.save_adapter(source, tmp_path)
    model = bert_lora(seed=1, bias=bias)
    params = {n: p for n, p in model.named_parameters()}
    restore_adapters(model, tmp_path)
    assert {n: p for n, p in model.named_parameters()} == params  # the same parameter objects
    expected, now = lorakit.lora_state_dict(source), lorakit.lora_state_dict(model)
    assert now.keys() == expected.keys() and all(torch.equal(now[k], expected[k]) for k in expected)
    # the head's bias; + query/value in 2 layers; all: 8 per layer, embedding LayerNorm, pooler, head
    assert sum(k.endswith(".bias") for k in now) == {"none": 1, "lora_only": 1 + 4, "all": 2 * 8 + 3}[bias]
    torch.testing.assert_close(logits(model.eval()), logits(source.eval()), atol=0, rtol=0)


def test_restore_needs_every_adapter_of_the_model(run):
    _, out = run
    model = lorakit.add_lora(bert_lora(), lorakit.LoraConfig(r=2, target_modules=["query"]), adapter="extra")
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"no lorakit/PEFT adapter for \['extra'\]"):
        restore_adapters(model, out / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match="no lorakit/PEFT adapter"):
        restore_adapters(model, out / "missing")
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no lorakit adapter to restore"):
        restore_adapters(bert_base(), out / "checkpoint-2")


def test_restore_refuses_non_finite_weights_and_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    lorakit.save_adapter(bert_lora(bias="lora_only"), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("value.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = bert_lora(seed=1, bias="lora_only")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        restore_adapters(model, tmp_path)
    _assert_unchanged(model, before)


def test_lora_trainer_on_a_model_without_adapters_is_the_plain_trainer(tmp_path):
    LoraTrainer(model=bert_base(), args=args(tmp_path, max_steps=1, save_steps=1), train_dataset=records(4)).train()
    listing = files(tmp_path / "checkpoint-1")
    assert "model.safetensors" in listing and "config.json" in listing and "adapter_config.json" not in listing
