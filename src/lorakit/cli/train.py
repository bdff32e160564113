"""``lorakit train``: fine-tune a LoRA adapter on a dataset; with no arguments, the offline demo
(pretrained MiniLM-L6 on the packaged SST-2 slice, LoRA r=8 on query,value + a trained classifier head)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
import types
import typing
from pathlib import Path

from ..core.config import LoraConfig
from ..core.quantized import PRESETS
from ..models import TASK_TYPES, head_module_names
from ..train.config import TrainConfig

HELP = "Train a LoRA adapter (no arguments: the offline SST-2 demo on the packaged MiniLM)."
RUN_ARGS = "run_args.json"

# The demo's settings (fit 2 CPU cores in a few minutes); every one can be overridden by a flag.
TRAIN_DEFAULTS = {
    "output_dir": "runs/sst2-minilm",
    "lr": 2e-3,
    "epochs": 3,
    "batch_size": 32,
    "group_by_length": True,
    "warmup_ratio": 0.06,
    "scheduler": "linear",
    "weight_decay": 0.01,
    "eval_every": None,
    "save_every": 50,
    "log_every": 10,
}


def _field_help(cls: type) -> dict[str, str]:
    """``name: text`` lines of a dataclass docstring's Args section (continuation lines joined)."""
    helps: dict[str, str] = {}
    last = None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"\s{8}([\w /]+): (.*)", line)
        if m:
            last = [n.strip() for n in m.group(1).split("/")]
            for n in last:
                helps[n] = m.group(2)
        elif last and line.startswith(" " * 12):
            for n in last:
                helps[n] += " " + line.strip()
    return helps


def _arg_type(annotation) -> tuple[type, bool]:
    """(scalar type, whether it is a bool flag) for a dataclass field annotation."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing) | {"Schedule": str})
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else [hint]
    base = args[0]
    if typing.get_origin(base) is typing.Literal:
        base = str
    return base, base is bool


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="model directory or hub id (default: the packaged pretrained MiniLM-L6)")
    g.add_argument("--data", help="data file, or a directory with train/dev files (default: packaged SST-2 slice)")
    g.add_argument("--task", choices=sorted(TASK_TYPES), default="classification", help="what to train")
    g.add_argument("--max-length", type=int, default=128, help="truncate examples to this many tokens")
    g.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    g.add_argument("--max-eval-examples", type=int, help="evaluate on only the first N dev examples")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8, help="rank")
    g.add_argument("--alpha", type=float, default=16.0, help="scaling numerator (update x alpha/r)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout on the LoRA input")
    g.add_argument("--target-modules", help="comma list of module names, a regex, or all-linear "
                   "(default: the architecture's query,value)")
    g.add_argument("--exclude-modules", help="comma list of module names never adapted")
    g.add_argument("--modules-to-save", help="comma list of modules trained in full (default: the classifier head)")
    g.add_argument("--bias", choices=["none", "all", "lora_only"], default="none")
    g.add_argument("--init", default="kaiming", help="kaiming, gaussian, or from the base weight (replaced by the "
                   "residual): pissa, pissa_niter_<K>, olora; loftq, loftq_<K> (QLoRA: with --quantize nf4)")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r)")
    g.add_argument("--quantize", choices=sorted(PRESETS), help="QLoRA: the frozen base in 4-bit (nf4: QLoRA's "
                   "NF4 + double quantization, fp4) or 8-bit (int8: LLM.int8), by bitsandbytes (lorakit[qlora])")
    g.add_argument("--use-dora", action="store_true", help="DoRA: learned magnitude x normalised direction")
    g.add_argument("--convert-to-lora", action="store_true", help="with --init pissa/olora: also write adapter-lora/, "
                   "the equivalent plain LoRA (rank 2r) for the original base")
    g = p.add_argument_group("training")
    helps = _field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind, is_bool = _arg_type(f.type)
        default = TRAIN_DEFAULTS.get(f.name, f.default)
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default, metavar=f.name.upper(),
                       type=_str2bool if is_bool else kind, help=helps.get(f.name, ""))


def _names(value: str | list | None) -> list[str] | str | None:
    if value is None or isinstance(value, list):
        return value
    if value == "all-linear" or any(c in value for c in "()[]*+?\\|^$"):
        return value  # a regex or all-linear
    return [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    if args.resume:
        saved = Path(args.resume) / RUN_ARGS
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no {RUN_ARGS} there (not a lorakit train output dir)")
        values = json.loads(saved.read_text())
        args = argparse.Namespace(**{**vars(args), **values, "resume": args.resume, "output_dir": args.resume})
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints

    def say(*a):
        if main:
            print(*a, flush=True)

    return _train(args, say)


def _train(args: argparse.Namespace, say) -> int:
    import torch

    from .. import add_lora, quantize, save_adapter, trainable_parameters
    from ..models import default_model_path, load_model, load_tokenizer
    from ..train.data import collate, default_data_dir, resolve_splits
    from ..train.evaluate import evaluate_classification, evaluate_perplexity
    from ..train.loop import train
    from ..train.tasks import load_task_data

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the new head and LoRA's A are drawn before train() seeds its own streams
    model_path = args.model or default_model_path()
    splits = resolve_splits(args.data or default_data_dir())
    if "train" not in splits:
        raise FileNotFoundError(f"--data {args.data}: no train file found")
    tokenizer = load_tokenizer(model_path)
    kw = {"max_length": args.max_length}
    train_data = load_task_data(splits["train"], args.task, tokenizer, **kw)
    if args.task == "classification":
        kw["label_names"] = train_data.label_names
    dev_data = load_task_data(splits["dev"], args.task, tokenizer, **kw) if "dev" in splits else None
    train_examples = train_data.examples[: args.max_train_examples]
    dev_examples = dev_data.examples[: args.max_eval_examples] if dev_data else None
    model = load_model(model_path, args.task, label_names=train_data.label_names)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(
        r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=_names(args.target_modules),
        exclude_modules=_names(args.exclude_modules), bias=args.bias, init=args.init, use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        modules_to_save=_names(args.modules_to_save) or (head_module_names(model) if args.task == "classification"
                                                         else None),
        task_type=TASK_TYPES[args.task], base_model_name_or_path=str(model_path),
    )
    if args.convert_to_lora and (lora.init in ("kaiming", "gaussian") or lora.init.startswith("loftq")):
        raise ValueError(f"--convert-to-lora needs an --init that replaces the base weight by a residual (pissa, "
                         f"olora...), got {lora.init!r}")
    add_lora(model, lora)
    if args.quantize:  # after add_lora: init loftq fits the adapter to the full-precision weights first
        quantize(model, **PRESETS[args.quantize])
    trainable, total = trainable_parameters(model)
    say(f"model        {model_path}")
    say(f"data         {splits['train']} ({len(train_examples)} train"
        + (f", {len(dev_examples)} dev)" if dev_examples else ")"))
    say(f"trainable    {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    pad = tokenizer.pad_token_id
    if args.task == "classification":
        def evaluate(m):
            return evaluate_classification(m, dev_examples, pad)
        metric, greater = "accuracy", True
    else:
        def evaluate(m):
            return evaluate_perplexity(m, dev_examples, pad)
        metric, greater = "loss", False
    train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
                            | {"metric": args.metric or metric, "greater_is_better": greater if args.metric is None
                               else args.greater_is_better})
    out = Path(train_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        _write_run_args(out / RUN_ARGS, args)
    before = evaluate(model) if dev_examples and not args.resume else None
    if before:
        say(f"dev before   {_fmt(before)}")
    result = train(model, train_examples, lambda b: collate(b, pad), train_cfg,
                   evaluate=evaluate if dev_examples else None, resume_from=True if args.resume else None)
    after = (result.final_metrics or evaluate(model)) if dev_examples else None
    adapter_dir = out / "adapter"
    if not (adapter_dir / "adapter_model.safetensors").exists():
        save_adapter(model, adapter_dir)
    if args.convert_to_lora:
        say(f"plain LoRA   {save_adapter(model, out / 'adapter-lora', convert_to_lora=True)} (for the original base)")
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    if after:
        say(f"dev after    {_fmt(after)}")
    say(f"adapter      {adapter_dir} ({size / 1024:.0f} KiB on disk)")
    if result.best_metric is not None:
        say(f"best         {train_cfg.metric}={result.best_metric:.4f} at step {result.best_step} -> {out / 'best'}")
    say(f"time         {time.perf_counter() - t0:.0f} s ({result.global_step} steps, torch threads "
        f"{torch.get_num_threads()})")
    return 0


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _write_run_args(path: Path, args: argparse.Namespace) -> None:
    """The run's options, local paths made absolute so ``--resume`` and ``eval`` work from any directory."""
    values = {k: v for k, v in vars(args).items() if k not in ("run", "_parser", "config", "resume")}
    for key in ("model", "data"):
        if values.get(key) and Path(values[key]).expanduser().exists():
            values[key] = str(Path(values[key]).expanduser().resolve())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2, default=str))
    os.replace(tmp, path)
