"""Evaluate a model on a task's dev examples: classification metrics, perplexity, E2E generation metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX, collate
from .metrics import accuracy, e2e_metrics, f1, mcc

# The LoRA paper's decoding for E2E (GPT-2): beam search, beam 10, length penalty 0.9, no-repeat 4-grams.
E2E_DECODING = {"num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4}
# The keys of the dicts that evaluate_classification / evaluate_perplexity return, first the one that picks `best/`.
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
PERPLEXITY_METRICS = ("loss", "perplexity")


def _length_sorted_batches(examples: Sequence[Mapping[str, Any]], batch_size: int):
    """Batches of indices grouped by length (little padding); callers put results back in order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_classification(model: nn.Module, examples: Sequence[Mapping[str, Any]], pad_token_id: int,
                            batch_size: int = 64) -> dict[str, float]:
    """Accuracy, F1 (binary: class 1; macro otherwise) and Matthews correlation on labelled examples."""
    was_training = model.training
    model.eval()
    preds = [0] * len(examples)
    device = _device(model)
    for idx in _length_sorted_batches(examples, batch_size):
        batch = collate([examples[i] for i in idx], pad_token_id)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
            preds[i] = p
    model.train(was_training)
    labels = [ex["labels"] for ex in examples]
    binary = max(labels + preds) <= 1
    values = (accuracy(preds, labels), f1(preds, labels, average="binary" if binary else "macro"), mcc(preds, labels))
    return dict(zip(CLASSIFICATION_METRICS, values, strict=True))


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, examples: Sequence[Mapping[str, Any]], pad_token_id: int,
                        batch_size: int = 16) -> dict[str, float]:
    """Mean token NLL and perplexity over the loss tokens (``labels != -100``)."""
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    device = _device(model)
    for idx in _length_sorted_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()  # (b, T-1, V): position t predicts token t+1
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                                reduction="sum")
        total += nll.item()
        n_tokens += int((target != IGNORE_INDEX).sum())
    model.train(was_training)
    if n_tokens == 0:
        raise ValueError("no loss tokens in the evaluation data")
    loss = total / n_tokens
    return dict(zip(PERPLEXITY_METRICS, (loss, math.exp(min(loss, 700.0))), strict=True))


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 64,
                   batch_size: int = 8, **decoding: Any) -> list[str]:
    """Decode a continuation of each prompt (token ids); left-padded batches; returns the new text only.

    Checked first: every prompt has a token, and the longest prompt plus ``max_new_tokens`` fits the model's
    positions (``n_positions`` / ``max_position_embeddings`` of its config), ValueError otherwise."""
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: there is nothing to continue")
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    longest = max((len(p) for p in prompts), default=0)
    if isinstance(limit, int) and longest + max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's {limit} "
                         "positions: shorten the prompt or lower max_new_tokens")
    model.eval()
    device = _device(model)
    pad = tokenizer.pad_token_id
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **decoding)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return outputs


def evaluate_e2e(model: nn.Module, tokenizer, references: Mapping[str, list[str]], max_new_tokens: int = 64,
                 batch_size: int = 4, **decoding: Any) -> tuple[dict[str, float], list[str]]:
    """Generate for each distinct MR (the paper's beam search by default) and score against its references."""
    from .tasks import e2e_prompt_ids

    mrs = list(references)
    prompts = [e2e_prompt_ids(mr, tokenizer) for mr in mrs]
    hyps = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, **{**E2E_DECODING, **decoding})
    return e2e_metrics(hyps, [references[mr] for mr in mrs]), hyps
