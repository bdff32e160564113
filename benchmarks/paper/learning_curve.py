"""Dev scores during training, every 100 steps: does a method leave the majority class, and when? (a side check)

    python benchmarks/paper/learning_curve.py cola full 1e-4 --train 3000 --steps 400
    python benchmarks/paper/learning_curve.py cola lora 2e-3 --steps 600

A plain loop (constant learning rate, batches of 16 drawn at random, no warmup), the same model, data and
trainable-parameter choices as glue.py; prints the mean training loss of the last 100 steps and the dev metrics
(the first 500 dev examples). Nothing is written.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from glue import TASKS, _set_trainable

import lorakit
from lorakit.models import default_model_path, head_module_names, load_model, load_tokenizer
from lorakit.train.data import collate, resolve_splits
from lorakit.train.evaluate import evaluate_classification
from lorakit.train.tasks import load_task_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("method", choices=["full", "bitfit", "head", "adapter", "lora"])
    p.add_argument("lr", type=float)
    p.add_argument("--train", type=int, default=10**9, help="training examples (glue.py's fixed random subset)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tok = load_tokenizer(default_model_path())
    splits = resolve_splits(TASKS[args.task][0])
    train = load_task_data(splits["train"], "classification", tok, max_length=128)
    dev = load_task_data(splits["dev"], "classification", tok, max_length=128,
                         label_names=train.label_names).examples[:500]
    examples = list(train.examples)
    random.Random(1234).shuffle(examples)
    examples = examples[: args.train]
    torch.manual_seed(args.seed)
    model = load_model(default_model_path(), "classification", label_names=train.label_names)
    head = head_module_names(model)
    if args.method == "lora":
        lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"],
                                                   modules_to_save=head))
    _set_trainable(model, args.method, head)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
    model.train()
    rng, losses = random.Random(args.seed), []
    for step in range(1, args.steps + 1):
        loss = model(**collate(rng.sample(examples, 16), tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0:
            m = evaluate_classification(model, dev, tok.pad_token_id)
            print(f"step {step}: loss {sum(losses[-100:]) / 100:.3f}  " +
                  "  ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
