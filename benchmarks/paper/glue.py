"""The paper's GLUE experiments on the pretrained MiniLM-L6-H384 (Tables 2, 5, 6 analogs), on CPU.

    python benchmarks/paper/glue.py quality          # 4 tasks x {full, BitFit, head, adapter, LoRA}
    python benchmarks/paper/glue.py rank             # SST-2, LoRA r in {1, 2, 4, 8, 64} on query,value
    python benchmarks/paper/glue.py matrices         # SST-2, fixed budget: q r=8, v r=8, qv r=4, qkvo r=2
    python benchmarks/paper/glue.py all --seeds 0 1 2
    python benchmarks/paper/glue.py quality --tasks cola --max-train 800   # override a task's budget
    python benchmarks/paper/tables.py                # renders benchmarks/paper/README.md from the results

Each task trains on its own budget (``budgets.py``: training examples, epochs, dev examples, max_length);
the command line can override it. Every run appends one JSON line to ``benchmarks/paper/results/glue.jsonl``
(task, method, seed, budget, trainable parameters, dev metrics, seconds), so an interrupted sweep keeps what it
finished and a rerun skips the runs already recorded (same spec, seed and budget). Runs go seed by seed: seed 0
of every experiment first, so a partial sweep still fills every table once.

Training is ``lorakit.train.loop.train`` (the loop of ``lorakit train``) with the same data code; the
baselines set ``requires_grad`` on the model directly. Because ``train`` writes an adapter at the end, the
baselines carry an inert LoRA adapter (rank 1 on the pooler, B = 0, frozen: it changes no output). The
Houlsby bottleneck adapter is a baseline of this benchmark only, not a lorakit feature.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from baselines import Bottleneck, add_houlsby
from budgets import BUDGETS, budget_of
from torch import nn

from lorakit.core.layers import Adapter

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results" / "glue.jsonl"
DATA = Path(os.environ.get("LORAKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

TASKS = {  # name -> (data dir, metric reported as in the paper)
    "sst2": (REPO / "src" / "lorakit" / "data" / "sst2", "accuracy"),  # whole sentences (see the README)
    "mrpc": (DATA / "mrpc", "f1"),
    "rte": (DATA / "rte", "accuracy"),
    "cola": (DATA / "cola", "mcc"),
}
QUALITY_TASKS = ["sst2", "cola", "mrpc", "rte"]  # cheapest first (RTE's long pairs cost the most)
# Learning rates: common values for each method, not tuned here (no budget for a search).
LR = {"full": 1e-4, "bitfit": 2e-3, "head": 5e-3, "adapter": 2e-3, "lora": 2e-3}
QV, QKVO = ["query", "value"], ["query", "key", "value", "attention.output.dense"]


def experiment(name: str, tasks: list[str] = QUALITY_TASKS) -> list[dict]:
    """The runs of one experiment (without the seed)."""
    lora = {"method": "lora", "task": "sst2", "alpha": 16}
    if name == "quality":
        return [{"method": "lora", "task": t, "r": 8, "alpha": 16, "targets": QV} if m == "lora" else
                {"method": m, "task": t} for t in tasks for m in ("lora", "head", "bitfit", "adapter", "full")]
    if name == "rank":  # alpha fixed at 16 for every r, as the paper keeps alpha at the first r it tried
        return [{**lora, "r": r, "targets": QV} for r in (1, 2, 4, 8, 64)]
    if name == "matrices":  # a fixed budget: rank x number of adapted matrices = 8 in every block
        return [{**lora, "r": 8, "targets": ["query"]}, {**lora, "r": 8, "targets": ["value"]},
                {**lora, "r": 4, "targets": QV}, {**lora, "r": 2, "targets": QKVO}]
    raise SystemExit(f"unknown experiment {name!r} (quality, rank, matrices, all)")


def run_key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in sorted(spec) if k not in ("experiment",)}, sort_keys=True)


# ----- baselines ---------------------------------------------------------------------------------------------
def _add_houlsby(model: nn.Module, size: int) -> None:
    """Bottlenecks after each block's attention output and FFN output ``dense``; trains them and the LayerNorms."""
    dim = model.config.hidden_size
    add_houlsby(model, ("output.dense",), dim, size)  # BERT's attention.output.dense and output.dense
    for m in model.modules():
        if isinstance(m, (Bottleneck, nn.LayerNorm)):
            m.requires_grad_(True)


def _set_trainable(model: nn.Module, method: str, head: list[str]) -> None:
    import lorakit

    if method == "lora":
        return
    lorakit.add_lora(model, lorakit.LoraConfig(r=1, target_modules=["pooler.dense"]))  # inert: B = 0, frozen
    for name, p in model.named_parameters():
        p.requires_grad_(method == "full" or (method == "bitfit" and name.endswith(".bias")))
    for m in model.modules():
        if isinstance(m, Adapter):
            m.requires_grad_(False)
    if method == "adapter":
        _add_houlsby(model, size=8)
    for h in head:
        getattr(model, h).requires_grad_(True)


_DATA: dict[str, tuple] = {}


# ----- one run -----------------------------------------------------------------------------------------------
def run_one(spec: dict, seed: int, budget: dict, workdir: Path) -> dict:
    import lorakit
    from lorakit.models import default_model_path, head_module_names, load_model, load_tokenizer
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import collate, resolve_splits
    from lorakit.train.evaluate import evaluate_classification
    from lorakit.train.loop import train
    from lorakit.train.metrics import accuracy, f1, mcc
    from lorakit.train.tasks import load_task_data

    t0 = time.perf_counter()
    data_dir, metric = TASKS[spec["task"]]
    model_path = default_model_path()
    key = (spec["task"], budget["max_train"], budget["max_eval"], budget["max_length"])
    if key not in _DATA:  # tokenized once per task, budget and process
        splits = resolve_splits(data_dir)
        tok = load_tokenizer(model_path)
        train_data = load_task_data(splits["train"], "classification", tok, max_length=budget["max_length"])
        dev = load_task_data(splits["dev"], "classification", tok, max_length=budget["max_length"],
                             label_names=train_data.label_names).examples[: budget["max_eval"]]
        examples = list(train_data.examples)
        random.Random(1234).shuffle(examples)  # the same capped subset for every method and seed
        _DATA[key] = (tok, train_data.label_names, examples[: budget["max_train"]], dev)
    tok, label_names, examples, dev = _DATA[key]
    torch.manual_seed(seed)
    model = load_model(model_path, "classification", label_names=label_names)
    head = head_module_names(model)
    if spec["method"] == "lora":
        lorakit.add_lora(model, lorakit.LoraConfig(r=spec["r"], alpha=spec["alpha"], dropout=0.1,
                                                   target_modules=spec["targets"], modules_to_save=head))
    _set_trainable(model, spec["method"], head)
    # the trainable head only (with LoRA, modules_to_save keeps a frozen original beside the trained copy)
    head_params = sum(p.numel() for h in head for p in getattr(model, h).parameters() if p.requires_grad)
    trainable, total = lorakit.trainable_parameters(model)
    out = workdir / f"{spec['task']}-{spec['method']}-{seed}"
    cfg = TrainConfig(output_dir=str(out), lr=LR[spec["method"]], epochs=budget["epochs"],
                      batch_size=budget["batch_size"],
                      warmup_ratio=0.06, weight_decay=0.01, group_by_length=True, seed=seed, save_every=None,
                      eval_every=10**9, progress=False, plot=False)  # one evaluation, at the end
    pad = tok.pad_token_id
    result = train(model, examples, lambda b: collate(b, pad), cfg,
                   evaluate=lambda m: evaluate_classification(m, dev, pad))
    labels = [ex["labels"] for ex in dev]
    top = max(set(labels), key=labels.count)  # the dev set's majority class, predicted for every example
    majority = {"accuracy": accuracy([top] * len(labels), labels), "f1": f1([top] * len(labels), labels),
                "mcc": mcc([top] * len(labels), labels)}
    return {"trainable": trainable, "trainable_without_head": trainable - head_params, "total": total,
            "metrics": result.final_metrics, "majority": majority, "metric": metric, "steps": result.global_step,
            "train_examples": len(examples), "dev_examples": len(dev), "epochs": budget["epochs"],
            "batch_size": budget["batch_size"], "max_length": budget["max_length"], "lr": LR[spec["method"]],
            "seconds": round(time.perf_counter() - t0, 1),
            "adapter_dir": str(out / "adapter")}


def _done(results: Path) -> set[tuple]:
    if not results.exists():
        return set()
    recs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(run_key(r["spec"]), r["seed"], json.dumps(budget_of(r), sort_keys=True)) for r in recs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="+", help="quality, rank, matrices or all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", choices=QUALITY_TASKS, default=QUALITY_TASKS, help="tasks of `quality`")
    over = "overrides budgets.py for every task run"
    p.add_argument("--max-train", type=int, help=f"training examples (a fixed random subset); {over}")
    p.add_argument("--max-eval", type=int, help=f"dev examples (the first N); {over}")
    p.add_argument("--max-length", type=int, help=over)
    p.add_argument("--epochs", type=int, help=over)
    p.add_argument("--batch-size", type=int, help=over)
    p.add_argument("--threads", type=int, default=1, help="1 keeps a shared machine's cores from thrashing")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "paper",
                   help="where runs are written; adapters of the rank runs are kept for lorakit analyze")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["quality", "rank", "matrices"] if args.experiments == ["all"] else args.experiments
    specs: list[dict] = []
    for name in names:
        for spec in experiment(name, args.tasks):
            if run_key(spec) not in {run_key(s) for s in specs}:
                specs.append(spec)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for spec in specs:
            budget = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in BUDGETS[spec["task"]].items()}
            if (run_key(spec), seed, json.dumps(budget, sort_keys=True)) in _done(args.results):
                continue  # re-read each time: sweeps may run side by side
            tag = "-".join(str(v) if not isinstance(v, list) else "+".join(v) for v in spec.values())
            workdir = args.workdir / tag.replace(".", "_")
            rec = run_one(spec, seed, budget, workdir)
            keep = spec["method"] == "lora" and spec["task"] == "sst2" and spec.get("targets") == QV
            if not keep:
                shutil.rmtree(workdir / f"{spec['task']}-{spec['method']}-{seed}", ignore_errors=True)
                rec["adapter_dir"] = None
            line = {"spec": spec, "seed": seed, "max_train": budget["max_train"], "budget": budget, **rec,
                    "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                               f"threads {torch.get_num_threads()}".strip()}
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            m = rec["metrics"] or {}
            print(f"{tag} seed {seed}: {rec['metric']} {m.get(rec['metric'], math.nan):.4f} "
                  f"trainable {rec['trainable']:,} {rec['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
