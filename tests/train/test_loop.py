"""The training loop in process: outputs, LoRA+, accumulation, schedule, early stopping, HF models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.core.layers import Adapter
from lorakit.train.config import LinearWarmupSchedule, TrainConfig, param_groups
from lorakit.train.loop import group_by_length, train
from lorakit.train.losses import label_smoothed_loss
from tests.train.tiny_run import TinyNet, build, collate, make_data


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path), lr=1e-2, batch_size=8, seed=3, progress=False, save_every=None,
                log_every=2, plot=False)
    return TrainConfig(**{**base, **kw})


def _adapter(path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_trains_and_writes_outputs(tmp_path):
    data = make_data(64)
    model = build(dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    acc = []

    def evaluate(m):
        batch = collate(data)
        acc.append((m(batch["x"])["logits"].argmax(-1) == batch["labels"]).float().mean().item())
        return {"accuracy": acc[-1], "loss": m(**batch)["loss"].item()}

    result = train(model, data, collate, _cfg(tmp_path, epochs=4, save_every=8, plot=True), evaluate=evaluate)
    assert result.global_step == 32 and not result.stopped_early
    assert result.best_metric == max(acc) and result.best_step in (8, 16, 24, 32)
    assert result.final_metrics["accuracy"] == acc[-1] and len(acc) == 4  # the last step's evaluation
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [8, 16, 24, 32]  # end of each epoch
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= set(train_recs[0])
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    for name in ("adapter", "best", "checkpoint/adapter"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert not list(tmp_path.glob("checkpoint.tmp-*"))  # no temp dirs left behind
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint", "checkpoint.old"]  # + fallback
    # only trainable parameters moved; the saved adapter reproduces the trained model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    torch.manual_seed(0)  # the base weights build() made
    fresh = TinyNet()
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    x = collate(data)["x"]
    model.eval()
    torch.testing.assert_close(fresh.eval()(x)["logits"], model(x)["logits"], rtol=0, atol=0)


def test_deterministic_with_dropout(tmp_path):
    data = make_data(48)
    runs = []
    for i in range(2):
        train(build(dropout=0.3), data, collate, _cfg(tmp_path / str(i), epochs=2))
        runs.append(_adapter(tmp_path / str(i) / "adapter"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_lora_plus_selects_lora_B_structurally():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.lora_B_head = nn.Linear(4, 2)  # a name that a substring match would get wrong

    model = lorakit.add_lora(Net(), lorakit.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["lora_B_head"]))
    groups = param_groups(model, TrainConfig(lr=1e-3, lora_plus_ratio=16))
    b_ids = {id(m.lora_B.weight) for m in model.modules() if isinstance(m, Adapter)}
    assert {id(p) for p in groups[1]["params"]} == b_ids and groups[1]["lr"] == pytest.approx(16e-3)
    assert len(groups[0]["params"]) == 3 and groups[0]["lr"] == 1e-3  # lora_A + the head copy's weight, bias
    assert len(param_groups(model, TrainConfig())) == 1


def test_grad_accum_matches_larger_batch(tmp_path):
    data = make_data(64)
    train(build(dropout=0.0), data, collate, _cfg(tmp_path / "a", batch_size=8, grad_accum=2, epochs=2))
    train(build(dropout=0.0), data, collate, _cfg(tmp_path / "b", batch_size=16, epochs=2))
    a, b = _adapter(tmp_path / "a" / "adapter"), _adapter(tmp_path / "b" / "adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule(kind):
    f = LinearWarmupSchedule(kind, warmup=4, total=20)
    assert [f(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f(20) == (1.0 if kind == "constant" else 0.0)
    if kind == "cosine":
        assert f(12) == pytest.approx(0.5)
    if kind == "linear":
        assert f(12) == pytest.approx(0.5)


def test_max_steps_and_lr_reaches_zero(tmp_path):
    data = make_data(40)  # 5 batches per epoch: max_steps runs over epochs
    result = train(build(0.0), data, collate, _cfg(tmp_path, max_steps=12, warmup_ratio=0.25, log_every=1))
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 12 and len(recs) == 12
    assert recs[0]["lr"] == pytest.approx(1e-2 / 3) and recs[-1]["lr"] == 0.0
    assert recs[-1]["epoch"] == pytest.approx(2.4)


def test_early_stopping_and_best(tmp_path):
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.95])

    def evaluate(m):
        return {"loss": 1.0, "f1": next(scores)}

    result = train(build(0.0), make_data(64), collate,
                   _cfg(tmp_path, epochs=10, eval_every=2, early_stopping_patience=3, metric="f1",
                        save_every=4), evaluate=evaluate)
    assert result.stopped_early and result.global_step == 10 and result.best_step == 4
    assert result.best_metric == 0.9
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["state"]
    assert state["stopped_early"] and state["global_step"] == 10 and state["bad_evals"] == 3
    # lower is better for a loss
    losses = iter([2.0, 1.0])
    result = train(build(0.0), make_data(64), collate, _cfg(tmp_path / "lo", max_steps=4, eval_every=2,
                   metric="loss", greater_is_better=False), evaluate=lambda m: {"loss": next(losses)})
    assert result.best_metric == 1.0 and result.best_step == 4


def test_unknown_metric_raises(tmp_path):
    with pytest.raises(KeyError, match="bleu"):
        train(build(0.0), make_data(16), collate, _cfg(tmp_path, metric="bleu"), evaluate=lambda m: {"acc": 1.0})


def test_loss_fn_and_missing_loss(tmp_path):
    model = lorakit.add_lora(nn.Sequential(nn.Linear(16, 4)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    data = make_data(16)
    coll = lambda ex: (collate(ex)["x"],)  # noqa: E731 - the model takes x only and returns logits
    with pytest.raises(ValueError, match="no loss"):
        train(model, data, coll, _cfg(tmp_path))

    def loss_fn(logits, batch):
        return logits.square().mean()

    result = train(model, data, coll, _cfg(tmp_path), loss_fn=loss_fn)
    assert result.global_step == 2


def test_bf16_autocast_on_cpu(tmp_path):
    result = train(build(0.0), make_data(16), collate, _cfg(tmp_path, bf16=True))
    assert result.global_step == 2
    assert all(math.isfinite(json.loads(x)["loss"]) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_hf_model_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("transformers")
    from tests.conftest import gpt2

    torch.manual_seed(0)
    model = lorakit.add_lora(gpt2(), lorakit.LoraConfig(r=4, target_modules=["c_attn"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 101, (16, 12), generator=g)]
    result = train(model, data, collate, _cfg(tmp_path, gradient_checkpointing=True, max_steps=3))
    assert result.global_step == 3 and model.is_gradient_checkpointing
    assert all(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, Adapter))


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_label_smoothed_loss_is_the_models_loss_smoothed(kind):
    pytest.importorskip("transformers")
    from tests.conftest import gpt2

    torch.manual_seed(0)
    if kind == "causal_lm":
        model = gpt2().eval()
        ids = torch.randint(0, 101, (3, 9))
        labels = ids.clone()
        labels[0, :4] = -100  # a prompt that is not trained on
        batch = {"input_ids": ids, "labels": labels}
        logits, target = model(input_ids=ids).logits[:, :-1], labels[:, 1:]  # position t predicts t+1
    else:
        from transformers import BertConfig, BertForSequenceClassification

        model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=20, vocab_size=50, num_labels=3)).eval()
        batch = {"input_ids": torch.randint(0, 50, (4, 7)), "labels": torch.tensor([0, 2, 1, 2])}
        logits, target = model(input_ids=batch["input_ids"]).logits, batch["labels"]
    with torch.no_grad():
        outputs = model(**batch)
        plain = label_smoothed_loss(0.0)(outputs, batch)
        smoothed = label_smoothed_loss(0.1)(outputs, batch)
    torch.testing.assert_close(plain, outputs.loss, atol=1e-6, rtol=1e-6)  # eps=0: transformers' own loss
    logp = logits.flatten(0, -2).log_softmax(-1)
    keep = target.flatten() != -100
    nll = -logp[keep].gather(1, target.flatten()[keep, None]).squeeze(1)
    expected = (0.9 * nll + 0.1 * -logp[keep].mean(-1)).mean()  # (1 - eps) on the label, eps spread uniformly
    torch.testing.assert_close(smoothed, expected, atol=1e-6, rtol=1e-6)  # fp32, summation order only


def test_label_smoothing_trains_and_refuses_a_loss_fn_beside_it(tmp_path):
    model = lorakit.add_lora(nn.Sequential(nn.Linear(16, 4)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    coll = lambda ex: (collate(ex)["x"],)  # noqa: E731
    with pytest.raises(ValueError, match="with loss_fn= smooth inside it"):
        train(model, make_data(16), coll, _cfg(tmp_path, label_smoothing=0.1), loss_fn=lambda out, b: out.sum())
    result = train(build(0.0), make_data(16), collate, _cfg(tmp_path, label_smoothing=0.1))
    assert result.global_step == 2


def test_config_validation():
    for bad in ({"scheduler": "step"}, {"batch_size": 0}, {"lr": 0}, {"warmup_ratio": 1.0},
                {"save_every": 0}, {"lora_plus_ratio": -1.0}, {"max_grad_norm": 0.0}, {"label_smoothing": 1.0},
                {"label_smoothing": -0.1}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_no_trainable_parameters(tmp_path):
    model = TinyNet().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, make_data(8), collate, _cfg(tmp_path))


def test_gradient_checkpointing_needs_support_and_hooks_frozen_embeddings(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 2)
            self.enabled = False

        def gradient_checkpointing_enable(self):
            self.enabled = True

        def get_input_embeddings(self):
            return self.emb

        def forward(self, ids, labels):
            h = self.emb(ids).mean(1)
            if self.enabled:  # reentrant checkpointing: no grad reaches fc's LoRA unless the input requires it
                h = torch.utils.checkpoint.checkpoint(self.fc, h, use_reentrant=True)
            else:
                h = self.fc(h)
            return {"loss": nn.functional.cross_entropy(h, labels)}

    data = [{"ids": torch.tensor([i % 10, (i + 3) % 10]), "labels": torch.tensor(i % 2)} for i in range(16)]
    model = lorakit.add_lora(Net(), lorakit.LoraConfig(r=2, target_modules=["fc"]))
    train(model, data, collate, _cfg(tmp_path, gradient_checkpointing=True))
    assert model.enabled and model.fc.adapters["default"].lora_B.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train(build(0.0), make_data(8), collate, _cfg(tmp_path, gradient_checkpointing=True))


def test_tensorboard_is_optional(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            train(build(0.0), make_data(8), collate, _cfg(tmp_path, tensorboard=True))
    else:
        train(build(0.0), make_data(8), collate, _cfg(tmp_path, tensorboard=True))
        assert list((tmp_path / "tensorboard").iterdir())


def test_group_by_length_batches_similar_lengths(tmp_path):
    """Each batch's padded width (its longest example) shrinks; the data still covers every example once per
    epoch, and the run stays deterministic."""
    data = make_data()
    lengths = torch.randint(1, 65, (len(data),), generator=torch.Generator().manual_seed(0)).tolist()
    for ex, n in zip(data, lengths, strict=True):
        ex["input_ids"] = list(range(n))

    def run(out, grouped):
        seen = []

        def collate_ids(batch):
            seen.append([len(ex["input_ids"]) for ex in batch])
            return collate([{k: v for k, v in ex.items() if k != "input_ids"} for ex in batch])

        train(build(0.0), data, collate_ids, _cfg(tmp_path / out, group_by_length=grouped))
        return seen

    plain, grouped = run("plain", False), run("grouped", True)
    assert sorted(n for b in grouped for n in b) == sorted(lengths)
    padded = {name: sum(max(b) * len(b) for b in seen) for name, seen in (("plain", plain), ("grouped", grouped))}
    assert padded["grouped"] < 0.6 * padded["plain"], padded
    assert grouped == run("again", True)
    assert _adapter(tmp_path / "grouped" / "adapter").keys() == _adapter(tmp_path / "again" / "adapter").keys()
    for k, v in _adapter(tmp_path / "grouped" / "adapter").items():
        assert torch.equal(v, _adapter(tmp_path / "again" / "adapter")[k]), k


def test_group_by_length_order_and_bad_examples(tmp_path):
    lengths = [3, 9, 1, 7, 5, 2]
    assert group_by_length([0, 1, 2, 3, 4, 5], lengths, 4) == [1, 3, 0, 2, 4, 5]
    with pytest.raises(ValueError, match="example 0 has no 'input_ids'"):
        train(build(0.0), make_data(), collate, _cfg(tmp_path, group_by_length=True))
