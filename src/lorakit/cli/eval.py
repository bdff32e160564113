"""``lorakit eval ADAPTER [--data DEV]``: accuracy/F1/MCC, perplexity, or the E2E metrics (BLEU, NIST, METEOR,
ROUGE-L, CIDEr) after beam-search decoding as in the LoRA paper."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import UsageError, add_base_quantize, check_output_file, positive_int

HELP = "Evaluate an adapter on a dataset: classification metrics, perplexity, or E2E generation metrics."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--data", help="evaluation file, or a directory (its dev/validation split is used); default: "
                   "the data of the `lorakit train` run the adapter came from")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--task", choices=["classification", "sft", "e2e"],
                   help="default: the task of the `lorakit train` run the adapter came from, else from the "
                   "adapter's task_type")
    p.add_argument("--max-length", type=positive_int, default=512)
    p.add_argument("--max-examples", type=positive_int, help="evaluate only the first N examples (E2E: the first N MRs)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="E2E: generation length")
    p.add_argument("--num-beams", type=positive_int, default=10, help="E2E: beam size (the paper: 10)")
    p.add_argument("--output", help="also write the metrics (and E2E hypotheses) to this JSON file")
    add_base_quantize(p)


def run(args: argparse.Namespace) -> int:
    from ..models import load_with_adapter
    from ..train.data import resolve_splits
    from ..train.evaluate import evaluate_classification, evaluate_e2e, evaluate_perplexity
    from ..train.state import write_text_atomic
    from ..train.tasks import load_task_data
    from ..variants.heads import class_names
    from .train import read_run_args

    if args.output:
        check_output_file(args.output, "--output")  # before the evaluation runs, not after
    run_args = read_run_args(Path(args.adapter), instead=None if args.data else "--data")
    splits = resolve_splits(args.data or _training_data(run_args))
    path = splits.get("dev") or splits.get("test") or splits.get("train")
    task = _task(args, run_args)  # checked before the model loads
    model, tokenizer, _ = load_with_adapter(args.adapter, args.model, quantize=args.quantize or "auto")
    result: dict = {}
    if task == "e2e":
        refs = _e2e_references(path, args.max_examples)
        metrics, hyps = evaluate_e2e(model, tokenizer, refs, args.max_new_tokens, args.batch_size,
                                     num_beams=args.num_beams)
        result["hypotheses"] = hyps
    else:
        kw = {"max_length": args.max_length}
        if task == "classification":
            kw["label_names"] = class_names(model)
        data = load_task_data(path, task, tokenizer, **kw)
        examples = data.examples[: args.max_examples]
        pad = tokenizer.pad_token_id
        metrics = (evaluate_classification(model, examples, pad, args.batch_size) if task == "classification"
                   else evaluate_perplexity(model, examples, pad, args.batch_size))
    result["metrics"] = metrics
    for k, v in metrics.items():
        print(f"{k:<12} {v:.4f}")
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=2))
    return 0


def _task(args: argparse.Namespace, run_args: dict) -> str:
    """The task to evaluate: ``--task`` (refused when the adapter is of another kind), else the training run's
    (e2e and sft adapters are both CAUSAL_LM: the run says which), else the adapter's kind."""
    from ..core.checkpoint import read_adapter
    from ..models import TASK_TYPES, task_for_adapter

    task = task_for_adapter(read_adapter(args.adapter)[0].task_type)
    trained_as = run_args.get("task")
    if not args.task and isinstance(trained_as, str) and TASK_TYPES.get(trained_as) == TASK_TYPES[task]:
        return trained_as
    if args.task and TASK_TYPES[args.task] != TASK_TYPES[task]:
        fits = " or ".join(t for t, kind in TASK_TYPES.items() if kind == TASK_TYPES[task])
        raise UsageError(f"--task {args.task} needs a {TASK_TYPES[args.task]} adapter; this one is "
                         f"{TASK_TYPES[task]} (use --task {fits})")
    return args.task or task


def _e2e_references(path, limit: int | None) -> dict[str, list[str]]:
    """The first ``limit`` MRs of the E2E file ``path``, each with all its references; a bad record is named with
    its file."""
    from ..train.data import DataError, read_records
    from ..train.tasks import group_references

    try:
        refs = group_references(read_records(path))
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return dict(list(refs.items())[:limit])


def _training_data(run_args: dict) -> str:
    """The ``--data`` of the ``lorakit train`` run (the packaged default when it used that)."""
    from ..train.data import default_data_dir

    data = run_args.get("data")
    if data is not None and not isinstance(data, str):
        raise UsageError(f"{run_args['_path']}: 'data' must be a path, got {data!r}; pass --data")
    return data or str(default_data_dir())
