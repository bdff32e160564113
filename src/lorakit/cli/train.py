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
from ..models import TASK_TYPES, head_module_names
from ..train.config import TrainConfig
from ..train.state import write_text_atomic
from ..variants.adalora import AdaLoraConfig
from ..variants.param_targets import ALL_EXPERTS
from ..variants.quantized import PRESETS
from .options import (
    UsageError,
    check_output_dir,
    file_values,
    finite_float,
    nullable,
    positive_float,
    positive_int,
    slice_mask,
    slice_masks,
    str2bool,
)

HELP = "Train a LoRA adapter (no arguments: the offline SST-2 demo on the packaged MiniLM)."
RUN_ARGS = "run_args.json"
# What a run writes into its output directory: --overwrite removes these (and nothing else).
RUN_OUTPUTS = ("adapter", "adapter-lora", "best", "checkpoint", "checkpoint.old", "checkpoint.damaged",
               "checkpoint.tmp-*", "metrics.jsonl", "training_curves.png", "tensorboard", RUN_ARGS)
# Options a --resume may change (the rest come from the run's run_args.json): its length and its reporting.
RESUMABLE = ("max_steps", "epochs", "save_every", "log_every", "eval_every", "progress", "plot", "tensorboard",
             "device")

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


def _arg_spec(hint) -> dict:
    """argparse ``type`` (and ``choices``) for a dataclass field's type hint: bools parse true/false, a
    ``Literal`` gives the choices, an optional field also accepts ``none``."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    base, spec = options[0], {}
    if typing.get_origin(base) is typing.Literal:
        spec["choices"] = typing.get_args(base)
        base = str
    kind = {bool: str2bool, float: finite_float}.get(base, base)
    spec["type"] = nullable(kind) if union and type(None) in typing.get_args(hint) else kind
    return spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="model directory or hub id (default: the packaged pretrained MiniLM-L6)")
    g.add_argument("--data", help="data file, or a directory with train/dev files (default: packaged SST-2 slice)")
    g.add_argument("--task", choices=sorted(TASK_TYPES), default="classification", help="what to train")
    g.add_argument("--max-length", type=positive_int, default=128, help="truncate examples to this many tokens")
    g.add_argument("--max-train-examples", type=positive_int, help="use only the first N training examples")
    g.add_argument("--max-eval-examples", type=positive_int, help="evaluate on only the first N dev examples")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (with "
                   f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE[:2])}: extend it)")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --output-dir")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=positive_int, default=8, help="rank")
    g.add_argument("--alpha", type=positive_float, default=16.0, help="scaling numerator (update x alpha/r)")
    g.add_argument("--dropout", type=finite_float, help="dropout on the LoRA input (default 0.1; 0 with "
                   "--target-parameters, which has no input to drop)")
    g.add_argument("--target-modules", help="comma list of module names, a regex, or all-linear "
                   "(default: the architecture's query,value; none when --target-parameters is given)")
    g.add_argument("--target-parameters", help="comma list of parameter names (experts.gate_up_proj,"
                   "experts.down_proj) or all-experts: LoRA on MoE experts' fused weights, one pair per expert. "
                   "Every linear layer and every expert: --target-modules all-linear --target-parameters all-experts")
    g.add_argument("--exclude-modules", help="comma list of module names never adapted")
    g.add_argument("--add-tokens", metavar="TOKENS", help="comma list of tokens to add to the tokenizer (special "
                   "tokens, e.g. '<|im_start|>,<|im_end|>'): the embeddings grow and only these rows of them train "
                   "(trainable tokens), beside LoRA; with --target-modules none, alone")
    g.add_argument("--slices", action="append", type=slice_mask, metavar="MODULE=MASK",
                   help="adapt a fused projection on some output slices only (repeatable): c_attn=1,0,1 is GPT-2's "
                   "q and v but not k, as in the paper")
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
    g = p.add_argument_group("AdaLoRA (--method adalora; arXiv 2303.10512)")
    g.add_argument("--method", choices=["lora", "adalora"], default="lora",
                   help="adalora: SVD-form adapters whose ranks are pruned from --init-rank to --target-rank")
    g.add_argument("--init-rank", type=int, help="AdaLoRA: initial rank per layer (default: --r)")
    g.add_argument("--target-rank", type=int, help="AdaLoRA: average final rank per layer (required)")
    g.add_argument("--tinit", type=int, help="AdaLoRA: steps before pruning starts (default: 10%% of the steps)")
    g.add_argument("--tfinal", type=int, help="AdaLoRA: last steps with fixed ranks (default: 20%% of the steps)")
    g.add_argument("--delta-t", type=int, help="AdaLoRA: steps between rank re-allocations (default: 10)")
    g.add_argument("--orth-reg-weight", type=float, help="AdaLoRA: weight of the orthogonality penalty (default: 0.1)")
    g = p.add_argument_group("training")
    helps, hints = _field_help(TrainConfig), typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = TRAIN_DEFAULTS.get(f.name, f.default)
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default, metavar=f.name.upper(),
                       help=helps.get(f.name, ""), **_arg_spec(hints[f.name]))


def _names(value: str | list | None) -> list[str] | str | None:
    if value is None or isinstance(value, list):
        return value
    if value.strip().lower() == "none":
        return []  # --target-modules none: no LoRA layer (trainable tokens alone)
    if value == "all-linear" or any(c in value for c in "()[]*+?\\|^$"):
        return value  # a regex or all-linear
    return [v.strip() for v in value.split(",") if v.strip()]


def _modules_to_save(args: argparse.Namespace, model) -> list[str] | str | None:
    """``--modules-to-save`` as given (``none``: nothing); unset, a classifier's head."""
    names = _names(args.modules_to_save)
    if names is None and args.task == "classification":
        names = head_module_names(model)
    return names or None


def _parameter_names(value: str | None) -> list[str] | str | None:
    if value is None or value == ALL_EXPERTS:
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def _dropout(args: argparse.Namespace) -> float:
    return args.dropout if args.dropout is not None else 0.0 if args.target_parameters else 0.1


def run(args: argparse.Namespace) -> int:
    if args.resume:
        args = _resumed_args(args)
    main = _is_main()  # under torchrun only rank 0 prints

    def say(*a):
        if main:
            print(*a, flush=True)

    return _train(args, say)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The run's saved options (``run_args.json``, checked like a config file), plus the options a resume may
    change (:data:`RESUMABLE`) when given as flags; any other flag is refused by name."""
    saved = Path(args.resume) / RUN_ARGS
    if not saved.is_file():
        raise UsageError(f"--resume {args.resume}: no {RUN_ARGS} there (not a lorakit train output dir)")
    if args.overwrite:
        raise UsageError("--resume continues a run, --overwrite replaces it: pass one of them")
    given = getattr(args, "_given", set()) - {"resume"}
    if args.output_dir in given and Path(args.output_dir).resolve() == Path(args.resume).resolve():
        given -= {"output_dir"}
    refused = sorted(given - set(RESUMABLE))
    if refused:
        flags = ", ".join("--" + n.replace("_", "-") for n in refused)
        raise UsageError(f"--resume continues the run with the options in {saved}; {flags} cannot change "
                         f"(only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} can)")
    try:
        values = json.loads(saved.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"{saved}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if isinstance(values, dict):
        values.pop("command", None)  # written by older versions: harmless
    values = file_values(args._parser, values, str(saved), skip=("run", "_parser", "resume", "overwrite"))
    return argparse.Namespace(**{**vars(args), **values, **{k: getattr(args, k) for k in given},
                                 "resume": args.resume, "output_dir": args.resume})


def _check_run(args: argparse.Namespace) -> TrainConfig:
    """Everything about the run that can be checked before the model and data load, writing nothing: every
    option's type and range (TrainConfig's fields), the output directory, the device, the optional packages
    asked for, the metric's name, and what a resume needs. Returns the run's TrainConfig."""
    from ..train.evaluate import CLASSIFICATION_METRICS, PERPLEXITY_METRICS
    from ..train.loop import check_environment
    from ..train.state import checkpoint_candidates

    names = CLASSIFICATION_METRICS if args.task == "classification" else PERPLEXITY_METRICS
    if args.metric is not None and args.metric not in names:
        raise UsageError(f"--metric {args.metric!r}: the {args.task} evaluation reports {', '.join(names)}")
    greater = args.greater_is_better if args.metric is not None else args.task == "classification"
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
                         | {"metric": args.metric or names[0], "greater_is_better": greater})
    _check_lora_options(args)
    out = check_output_dir(config.output_dir, "--output-dir")
    check_environment(config)
    if args.resume:
        found = checkpoint_candidates(out)
        if not found:
            raise UsageError(f"--resume {out}: no complete training checkpoint there (was save_every set?)")
        state = _first_readable_state(found)
        if "max_steps" in getattr(args, "_given", ()) and config.max_steps is not None:
            if state.stopped_early:
                raise UsageError(f"--max-steps: the run in {out} stopped early at step {state.global_step} "
                                 "(early_stopping_patience); it cannot be extended")
            if config.max_steps <= state.global_step:
                raise UsageError(f"--max-steps {config.max_steps}: the run in {out} is already at step "
                                 f"{state.global_step}; give a larger value to extend it")
    elif not args.overwrite and _is_main() and out.is_dir() and any(out.iterdir()):  # rank 0 decides (it writes)
        raise UsageError(f"--output-dir {out} is not empty; pass --resume {out} to continue that run or "
                         "--overwrite to replace its outputs")
    return config


def _check_lora_options(args: argparse.Namespace) -> None:
    """LoraConfig checks (types, ranges) every option named like one of its fields, before the model loads: a
    LoRA flag added later is checked with no code here. The real config is built after the model loads."""
    lists = ("target_modules", "exclude_modules", "modules_to_save")
    convert = {**dict.fromkeys(lists, _names), "slices": slice_masks, "target_parameters": _parameter_names}
    tokens = added_tokens(args.add_tokens)
    if (args.target_modules or "").strip().lower() == "none" and not tokens:
        raise UsageError("--target-modules none adapts nothing without --add-tokens")
    if tokens and args.method == "adalora":
        raise UsageError("--add-tokens is not supported with --method adalora")
    LoraConfig(**{f.name: convert.get(f.name, lambda v: v)(value) for f in dataclasses.fields(LoraConfig)
                  if (value := getattr(args, f.name, None)) is not None},
               trainable_token_indices=[0] if tokens else None)  # the ids are known once the tokenizer loads


def added_tokens(value: str | None) -> list[str]:
    """``--add-tokens "<a>,<b>"`` -> ``["<a>", "<b>"]`` (stripped, duplicates dropped); an empty list is an error."""
    if value is None:
        return []
    tokens = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    if not tokens:
        raise UsageError(f"--add-tokens {value!r} names no token")
    return tokens


def _first_readable_state(checkpoints: list[Path]):
    """The state of the checkpoint a resume will start from (the newest readable one; the loop falls back the
    same way)."""
    from ..train.state import CheckpointError, read_state

    for i, path in enumerate(checkpoints):
        try:
            return read_state(path)[0]
        except CheckpointError:
            if i + 1 == len(checkpoints):
                raise


def _prepare_output(out: Path, args: argparse.Namespace) -> None:
    """The run's first write: (--overwrite) the previous run's outputs removed, then ``run_args.json``."""
    import shutil

    if args.resume or not _is_main():
        return
    if args.overwrite and out.is_dir():
        for pattern in RUN_OUTPUTS:
            for old in out.glob(pattern):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_run_args(out / RUN_ARGS, args)


def _task_data(args: argparse.Namespace, splits: dict, tokenizer):
    """The task's train data and the (capped) train and dev examples; class names from ``labels.txt``."""
    from ..train.data import default_data_dir, label_names_in
    from ..train.tasks import load_task_data

    kw = {"max_length": args.max_length}
    names = label_names_in(args.data or default_data_dir()) if args.task == "classification" else None
    if names:  # the data folder's labels.txt: integer labels index into it
        kw["label_names"] = names
    train_data = load_task_data(splits["train"], args.task, tokenizer, **kw)
    if args.task == "classification":
        kw["label_names"] = train_data.label_names
    dev_data = load_task_data(splits["dev"], args.task, tokenizer, **kw) if "dev" in splits else None
    dev_examples = dev_data.examples[: args.max_eval_examples] if dev_data else None
    return train_data, train_data.examples[: args.max_train_examples], dev_examples


def _lora_config(args: argparse.Namespace, rank: int, model, model_path, token_ids: dict) -> LoraConfig:
    """The run's adapter config from its flags (AdaLoRA's with ``--method adalora``)."""
    lora = (AdaLoraConfig if args.method == "adalora" else LoraConfig)(
        r=rank, alpha=args.alpha, dropout=_dropout(args), target_modules=_names(args.target_modules),
        target_parameters=_parameter_names(args.target_parameters),
        exclude_modules=_names(args.exclude_modules), bias=args.bias, init=args.init, use_rslora=args.use_rslora,
        use_dora=args.use_dora, slices=slice_masks(args.slices) or {},
        modules_to_save=_modules_to_save(args, model),
        task_type=TASK_TYPES[args.task], base_model_name_or_path=str(model_path),
        trainable_token_indices=sorted(set(token_ids.values())) or None,
    )
    if args.convert_to_lora and (lora.init in ("kaiming", "gaussian") or lora.init.startswith("loftq")):
        raise ValueError(f"--convert-to-lora needs an --init that replaces the base weight by a residual (pissa, "
                         f"olora...), got {lora.init!r}")
    return lora


def _adapted_model(args: argparse.Namespace, rank: int, model_path: str, splits: dict):
    """The tokenizer (with ``--add-tokens``), the capped train and dev examples, and the base model with the run's
    adapter on it (quantized with ``--quantize``): ``(model, tokenizer, train_examples, dev_examples)``."""
    from .. import add_lora, quantize
    from ..models import add_vocabulary, load_model, load_tokenizer
    from ..variants.tokens import record_added_tokens

    tokenizer = load_tokenizer(model_path)
    tokens = added_tokens(args.add_tokens)
    tokenizer.add_tokens(tokens, special_tokens=True)  # before the data is tokenized: each is one token
    train_data, train_examples, dev_examples = _task_data(args, splits, tokenizer)
    model = load_model(model_path, args.task, label_names=train_data.label_names)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    token_ids = add_vocabulary(model, tokenizer, tokens) if tokens else {}
    add_lora(model, _lora_config(args, rank, model, model_path, token_ids))
    if token_ids:  # saved with the adapter: generate / eval / merge add them to the base tokenizer again
        record_added_tokens(model, token_ids)
    if args.quantize:  # after add_lora: init loftq fits the adapter to the full-precision weights first
        quantize(model, **PRESETS[args.quantize])
    return model, tokenizer, train_examples, dev_examples


def _train(args: argparse.Namespace, say) -> int:
    import torch

    from .. import save_adapter, trainable_parameters
    from ..models import default_model_path
    from ..train.data import collate, default_data_dir, resolve_splits
    from ..train.evaluate import evaluate_classification, evaluate_perplexity
    from ..train.loop import batches_per_epoch, train

    t0 = time.perf_counter()
    rank = _adalora_rank(args)
    train_cfg = _check_run(args)  # nothing is written before every check passed
    torch.manual_seed(args.seed)  # the new head and LoRA's A are drawn before train() seeds its own streams
    model_path = args.model or default_model_path()
    splits = resolve_splits(args.data or default_data_dir())
    if "train" not in splits:
        raise FileNotFoundError(f"--data {args.data}: no train file found")
    model, tokenizer, train_examples, dev_examples = _adapted_model(args, rank, model_path, splits)
    batches_per_epoch(len(train_examples), train_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    trainable, total = trainable_parameters(model)
    say(f"model        {model_path}")
    say(f"data         {splits['train']} ({len(train_examples)} train"
        + (f", {len(dev_examples)} dev)" if dev_examples else ")"))
    say(f"trainable    {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    pad = tokenizer.pad_token_id
    if args.task == "classification":
        def evaluate(m):
            return evaluate_classification(m, dev_examples, pad)
    else:
        def evaluate(m):
            return evaluate_perplexity(m, dev_examples, pad)
    hook = _allocator(model, args, len(train_examples), train_cfg) if args.method == "adalora" else None
    out = Path(train_cfg.output_dir)
    _prepare_output(out, args)
    before = evaluate(model) if dev_examples and not args.resume else None
    if before:
        say(f"dev before   {_fmt(before)}")
    result = train(model, train_examples, lambda b: collate(b, pad), train_cfg,
                   evaluate=evaluate if dev_examples else None, resume_from=True if args.resume else None,
                   step_hook=hook)
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
    if hook is not None:
        say(f"ranks        {sum(hook.rank_pattern().values())} of {hook.init_budget} triplets kept: "
            + " ".join(f"{p}={n}" for p, n in hook.rank_pattern().items()))
    say(f"time         {time.perf_counter() - t0:.0f} s ({result.global_step} steps, torch threads "
        f"{torch.get_num_threads()})")
    return 0


def _adalora_rank(args: argparse.Namespace) -> int:
    """The adapter's rank: --init-rank for AdaLoRA (default --r); AdaLoRA's flags refused without it."""
    if args.method == "adalora":
        if args.target_rank is None:
            raise ValueError("--method adalora needs --target-rank (the average final rank per layer)")
        return args.r if args.init_rank is None else args.init_rank
    given = [f for f in ("init_rank", "target_rank", "tinit", "tfinal", "delta_t", "orth_reg_weight")
             if getattr(args, f) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is an AdaLoRA option: add --method adalora")
    return args.r


def _allocator(model, args: argparse.Namespace, n_examples: int, train_cfg: TrainConfig):
    """AdaLoRA's rank allocator over the whole run (its steps counted as the loop counts them)."""
    from ..train.loop import total_steps
    from ..variants.adalora import AdaLoraAllocator

    if train_cfg.fsdp:
        raise ValueError("--method adalora does not support --fsdp (the allocator reads whole P, Λ, Q); use DDP")
    total = total_steps(n_examples, train_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    tinit = total // 10 if args.tinit is None else args.tinit
    tfinal = total // 5 if args.tfinal is None else args.tfinal
    return AdaLoraAllocator(model, target_rank=args.target_rank, total_steps=total, tinit=tinit, tfinal=tfinal,
                            delta_t=10 if args.delta_t is None else args.delta_t,
                            orth_reg_weight=0.1 if args.orth_reg_weight is None else args.orth_reg_weight)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _write_run_args(path: Path, args: argparse.Namespace) -> None:
    """The run's options, local paths made absolute so ``--resume`` and ``eval`` work from any directory."""
    values = {k: v for k, v in vars(args).items()
              if k not in ("run", "_parser", "_given", "command", "config", "resume", "overwrite")}
    for key in ("model", "data"):
        if values.get(key) and Path(values[key]).expanduser().exists():
            values[key] = str(Path(values[key]).expanduser().resolve())
    write_text_atomic(path, json.dumps(values, indent=2, default=str))


def read_run_args(adapter: Path, instead: str | None = None) -> dict:
    """The options of the ``lorakit train`` run whose output directory holds ``adapter`` (``"_path"``: the file).

    Without such a readable file: ``{}``, or, when the caller needs it, an error saying to pass ``instead``.
    """
    from ..core.checkpoint import check_adapter_dir

    check_adapter_dir(adapter)  # an adapter first: a run's output dir given for its adapter/ is named as such
    path = adapter.resolve().parent / RUN_ARGS
    problem = None if path.is_file() else f"{adapter} is not in a lorakit train output dir (no {RUN_ARGS} beside it)"
    values: object = None
    if problem is None:
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            problem = None if isinstance(values, dict) else f"{path}: not a JSON object of options"
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            problem = f"{path}: not valid JSON ({type(e).__name__})"
    if problem is None:
        return {**values, "_path": str(path)}
    if instead is None:
        return {}
    raise UsageError(f"pass {instead}: {problem}")
