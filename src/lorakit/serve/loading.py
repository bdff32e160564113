"""Building a server's front object from a base model and adapters on disk (``lorakit.models``).

:func:`build_frontend` reads the adapters, loads the base for their task (in the 4/8-bit form they record),
and wraps it in an (unstarted) :class:`~lorakit.serve.engine.Engine` behind a
:class:`~lorakit.serve.frontend.Frontend`. Tests call it with tiny models.
"""

from __future__ import annotations

from pathlib import Path

from ..models import (
    apply_vocabulary,
    base_quantization_for,
    load_model,
    load_tokenizer,
    num_labels_in,
    plan_vocabulary,
    quantize_base,
    task_for_adapter,
)
from .adapters import AdapterStore, discover
from .engine import Engine
from .frontend import Frontend
from .metrics import ServeMetrics


def base_name_of(model: str) -> str:
    """The name requests use for the base model: its directory's name (``.../NAME/model``: NAME), or the hub id."""
    path = Path(model)
    if not path.exists():
        return model  # a hub id
    return path.parent.name if path.name == "model" else path.name


def build_frontend(model: str, adapters: dict[str, Path] | None = None, adapters_dir: Path | None = None,
                   max_batch_size: int = 32, max_loaded: int = 8, metrics: ServeMetrics | None = None,
                   quantize: str | None = "auto") -> Frontend:
    """Load ``model`` for the adapters' task; the front object over an unstarted engine.

    ``quantize``: the base's 4/8-bit form (``lorakit.models.base_quantization_for``); ``"auto"``: the one the
    first readable adapter was trained on (QLoRA adapters record it), else full precision.
    """
    base_name = base_name_of(model)
    known = discover(base_name, adapters, adapters_dir)  # lists and checks every adapter before loading
    task, num_labels, labels, recorded = first_readable(known)
    quantization = base_quantization_for(recorded, quantize)  # checked before the model loads
    task = task or task_of_model(model)
    net = load_model(model, task, num_labels=num_labels, label_names=labels).eval()
    tokenizer = load_tokenizer(model)
    grow_vocabulary(net, tokenizer, known)  # the tokens adapters added (lorakit train --add-tokens)
    quantize_base(net, quantization)  # before any adapter: each then wraps its 4/8-bit layer
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    metrics = metrics or ServeMetrics()
    store = AdapterStore(net, base_name, known, adapters_dir, max_loaded, tokenizer=tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = Engine(store, task, pad_id=pad, eos_ids={tokenizer.eos_token_id} - {None},
                    max_batch_size=max_batch_size, metrics=metrics)
    trained = task != "classification" or head_in_checkpoint(model, net.config.num_labels)
    return Frontend(engine, tokenizer, metrics, base_head_trained=trained)


def grow_vocabulary(net, tokenizer, known: dict) -> None:
    """Add the union of the tokens the known adapters added to ``tokenizer`` and grow ``net``'s embeddings to fit
    (:func:`lorakit.models.plan_vocabulary`: adapters taken in the order they are listed). An adapter whose
    tokens conflict is marked with the reason, naming the adapter it conflicts with: its requests fail with it,
    the others are served."""
    vocabulary = plan_vocabulary(tokenizer, {n: info.vocab for n, info in known.items() if not info.error})
    for name, why in vocabulary.refused.items():
        known[name].error = why
    apply_vocabulary(net, tokenizer, vocabulary)


def head_in_checkpoint(model: str, num_labels: int) -> bool:
    """Whether ``model``'s checkpoint holds a classification head of ``num_labels`` classes (else the loaded
    head was drawn at random: an encoder checkpoint, or a head of another size)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    return classifier and config.num_labels == num_labels


def first_readable(known: dict) -> tuple[str | None, int | None, list[str] | None, dict]:
    """The first readable adapter's task, class count, class names and recorded quantization (the base's
    form); an unreadable one is marked with its error (its requests fail with it, the others are served)."""
    from ..core.checkpoint import read_adapter
    from ..core.config import LORAKIT_KEY

    for info in known.values():
        if info.error:
            continue
        try:
            config, raw, tensors = read_adapter(info.path)
        except (OSError, ValueError) as e:
            info.error = str(e)
            continue
        num_labels = num_labels_in(tensors)
        labels = info.labels if info.labels and len(info.labels) == num_labels else None
        return task_for_adapter(config.task_type), num_labels, labels, {
            str(info.path): raw[LORAKIT_KEY].get("quantization")}
    return None, None, None, {}


def task_of_model(model: str) -> str:
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model).architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "sft" if causal else "classification"  # an encoder (BertModel, ...) gets a classification head
