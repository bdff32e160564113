"""Task formatting: dataset records -> tokenized examples (classification, SFT, E2E).

Three tasks, in the :data:`TASKS` table (name -> function ``(records, tokenizer, **kw) -> TaskData``):

- ``classification``: text [+ text pair] + label -> ``input_ids``, ``attention_mask``
  [, ``token_type_ids``], ``labels`` (an int). String labels get ids from a sorted, reported
  label list (or one you pass, e.g. the train split's for the dev split).
- ``sft``: causal-LM supervised fine-tuning. Records are normalised to chat ``messages``
  (:func:`sft_messages`), rendered with the tokenizer's chat template when it has one, else
  with a plain Alpaca-style template. ``labels`` is -100 on prompt tokens; loss falls on
  assistant tokens and the closing EOS.
- ``e2e``: data-to-text as the LoRA paper fed GPT-2: ``MR`` tokens, a separator (BOS, else
  EOS), then ``" " + reference`` and EOS; loss on the reference part only.

Examples are dicts of Python lists in a :class:`~lorakit.train.data.TaskData`;
:func:`lorakit.train.data.collate` pads them into LongTensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.train.data import IGNORE_INDEX, DataError, TaskData, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PLAIN_PREAMBLE",
    "TASKS",
    "classification_examples",
    "e2e_examples",
    "e2e_prompt_ids",
    "group_references",
    "load_task_data",
    "sft_examples",
    "sft_messages",
    "sft_prompt_ids",
]

PLAIN_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
"""Opening of the plain (no chat template) SFT prompt; a ``system`` message replaces it."""

# Known (text, text pair) column pairs, then single text columns, tried in order.
_PAIR_FIELDS = (
    ("sentence1", "sentence2"),
    ("#1 String", "#2 String"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("text", "text_pair"),
)
_TEXT_FIELDS = ("sentence", "text")
_LABEL_FIELDS = ("label", "Quality", "labels", "gold_label")


# ---------------------------------------------------------------------------------------------
# classification


def classification_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 128,
    label_names: Sequence[str] | None = None,
    text_field: str | None = None,
    pair_field: str | None = None,
    label_field: str | None = None,
) -> TaskData:
    """Tokenize (text [, pair], label) records for sequence classification.

    Columns are found by name (``sentence``/``text``, GLUE pairs such as ``sentence1`` +
    ``sentence2`` or ``#1 String`` + ``#2 String``; label ``label``/``Quality``) unless given.
    Labels: with ``label_names``, a label is looked up by name, else read as an index into it.
    Without, integer labels are kept (names ``"0".."max"``) and string labels are numbered in
    sorted order.

    Raises:
        DataError: no records, a missing column, an empty/unknown/out-of-range label.
    """
    if not records:
        raise DataError("empty dataset (no records)")
    text_field, pair_field, label_field = _find_fields(records[0], text_field, pair_field, label_field)
    texts = [_text(r, text_field, i) for i, r in enumerate(records)]
    pairs = [_text(r, pair_field, i) for i, r in enumerate(records)] if pair_field else None
    labels, names = _label_ids([r.get(label_field) for r in records], label_names)
    examples: list[dict[str, Any]] = []
    chunk = 1024
    for start in range(0, len(texts), chunk):
        args = [texts[start : start + chunk]]
        if pairs is not None:
            args.append(pairs[start : start + chunk])
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for j in range(len(enc["input_ids"])):
            ex = {k: list(enc[k][j]) for k in keys}
            ex["labels"] = labels[start + j]
            examples.append(ex)
    return TaskData(examples, label_names=names)


def _find_fields(
    rec: Mapping[str, Any], text: str | None, pair: str | None, label: str | None
) -> tuple[str, str | None, str]:
    found = ", ".join(map(str, rec)) or "none"
    for name in (text, pair, label):
        if name is not None and name not in rec:
            raise DataError(f"missing column '{name}'; columns found: {found}")
    if text is None:
        for t, p in _PAIR_FIELDS:
            if t in rec and p in rec and pair in (None, p):
                text, pair = t, p
                break
        else:
            text = next((t for t in _TEXT_FIELDS if t in rec), None)
        if text is None:
            wanted = ", ".join([t for t, _ in _PAIR_FIELDS] + list(_TEXT_FIELDS))
            raise DataError(f"missing text column (one of {wanted}); columns found: {found}")
    if label is None:
        label = next((f for f in _LABEL_FIELDS if f in rec), None)
        if label is None:
            raise DataError(
                f"missing label column (one of {', '.join(_LABEL_FIELDS)}); columns found: {found}"
            )
    return text, pair, label


def _text(rec: Mapping[str, Any], field: str, i: int) -> str:
    if field not in rec:
        raise DataError(
            f"record {i + 1}: missing column '{field}'; columns found: {', '.join(map(str, rec))}"
        )
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(f"record {i + 1}: column '{field}' is {type(value).__name__}, expected text")
    return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _label_ids(raw: list[Any], label_names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Map raw labels to ids; return (ids, names)."""
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"record {i + 1}: empty label")
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: k for k, n in enumerate(names)}
        ids = []
        for i, v in enumerate(raw):
            key = str(v).strip()
            k = index.get(key, _as_int(v))
            if k is None:
                raise DataError(f"record {i + 1}: unknown label '{key}'; known labels: {', '.join(names)}")
            if not 0 <= k < len(names):
                raise DataError(f"record {i + 1}: label {k} out of range [0, {len(names)})")
            ids.append(k)
        return ids, names
    ints = [_as_int(v) for v in raw]
    if all(k is not None for k in ints):
        for i, k in enumerate(ints):
            if k < 0:
                raise DataError(f"record {i + 1}: label {k} out of range (labels must be >= 0)")
        return ints, [str(k) for k in range(max(ints) + 1)]
    if all(isinstance(v, (int, float)) or _is_float(v) for v in raw):
        raise DataError(
            "labels are non-integer numbers (a regression target?); classification needs "
            "integer or string labels"
        )
    names = sorted({str(v).strip() for v in raw})
    index = {n: k for k, n in enumerate(names)}
    return [index[str(v).strip()] for v in raw], names


def _is_float(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# SFT


def sft_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """Normalise one SFT record to chat messages ending with an assistant turn.

    Accepted layouts: ``messages`` (list of ``{role, content}``); ``prompt``/``response``
    (or ``completion``); Alpaca ``instruction`` [/ ``input``] / ``output``; Self-Instruct
    ``instruction`` + ``instances[0].input/output``; GSM8K ``question``/``answer``. A non-empty
    ``input`` is appended to the instruction after a blank line.
    """
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list of {role, content}")
        out = []
        for m in msgs:
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in ("system", "user", "assistant")
            ):
                raise DataError(f"bad message {m!r}: need role system/user/assistant and text content")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise DataError("'messages' must end with an assistant turn")
        return out
    rec = dict(record)
    if "instances" in rec and "output" not in rec:
        inst = rec["instances"]
        if not isinstance(inst, list) or not inst or not isinstance(inst[0], Mapping):
            raise DataError("'instances' must be a non-empty list of {input, output}")
        rec.update(input=inst[0].get("input", ""), output=inst[0].get("output"))
    for p, r in (
        ("prompt", "response"),
        ("prompt", "completion"),
        ("instruction", "output"),
        ("question", "answer"),
    ):
        if p in rec and r in rec:
            prompt, response = rec[p], rec[r]
            extra = rec.get("input") if p == "instruction" else None
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"'{p}' and '{r}' must be text")
            if isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise DataError(
        "no SFT fields: expected messages, prompt/response, instruction/output, instruction+instances "
        f"or question/answer; keys found: {', '.join(map(str, record)) or 'none'}"
    )


def sft_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    use_chat_template: bool | None = None,
) -> TaskData:
    """Tokenize SFT records: labels are -100 except on assistant tokens and the final EOS.

    ``use_chat_template=None`` uses ``tokenizer.chat_template`` when set. Sequences are cut to
    ``max_length`` from the right; examples left without any loss token are skipped and counted.
    """
    if not records:
        raise DataError("empty dataset (no records)")
    examples, skipped = [], 0
    for i, rec in enumerate(records):
        segments = _sft_segments(_with_record(sft_messages, rec, i), tokenizer, use_chat_template)
        ex = _example(segments, max_length)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    return TaskData(examples, skipped=skipped)


def sft_prompt_ids(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, *, use_chat_template: bool | None = None
) -> list[int]:
    """Token ids of the prompt for generation: everything before the last assistant reply."""
    segments = _sft_segments(sft_messages(record), tokenizer, use_chat_template)
    last = max(k for k, (_, trained) in enumerate(segments) if trained)
    while last > 0 and segments[last - 1][1]:
        last -= 1
    return [t for ids, _ in segments[:last] for t in ids]


def _with_record(fn: Callable[[Any], Any], rec: Any, i: int) -> Any:
    try:
        return fn(rec)
    except DataError as e:
        raise DataError(f"record {i + 1}: {e}") from None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token; set one (causal-LM tasks end each target with EOS)")
    return tokenizer.eos_token_id


def _sft_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool | None
) -> list[tuple[list[int], bool]]:
    """Render messages to (token ids, trained?) segments, EOS included."""
    eos = _eos_id(tokenizer)
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    pieces: list[tuple[str, bool]] = []
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("use_chat_template=True but the tokenizer has no chat_template")

        def render(msgs: list[dict[str, str]], gen: bool) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        done = ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, full = render(messages[:k], True), render(messages[: k + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    f"chat template does not render assistant turn {k} after its prompt; "
                    "cannot tell prompt tokens from response tokens"
                )
            pieces += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
            done = full
        segments = [(_encode(tokenizer, text), trained) for text, trained in pieces]
        if not segments[-1][0] or segments[-1][0][-1] != eos:
            segments.append(([eos], True))
        return segments
    bos = tokenizer.bos_token_id
    segments = [([bos], False)] if bos is not None and bos != eos else []
    head = PLAIN_PREAMBLE
    if messages[0]["role"] == "system":
        head = messages[0]["content"].rstrip() + "\n\n"
        messages = messages[1:]
    for m in messages:
        if m["role"] == "assistant":
            segments += [
                (_encode(tokenizer, head + "### Response:\n"), False),
                (_encode(tokenizer, m["content"]) + [eos], True),
            ]
            head = "\n\n"
        else:
            head += f"### Instruction:\n{m['content']}\n\n"
    return segments


def _example(segments: list[tuple[list[int], bool]], max_length: int) -> dict[str, list[int]] | None:
    """Concatenate segments, truncate, and mask untrained ones; ``None`` if no loss token is left."""
    ids = [t for seg, _ in segments for t in seg][:max_length]
    labels = [t if trained else IGNORE_INDEX for seg, trained in segments for t in seg][:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# ---------------------------------------------------------------------------------------------
# E2E


def _mr_ref(rec: Mapping[str, Any]) -> tuple[str, str]:
    for m, r in (("mr", "ref"), ("context", "completion")):
        if m in rec and r in rec:
            return str(rec[m]).strip(), str(rec[r]).strip()
    raise DataError(
        f"no E2E fields: expected mr/ref or context/completion; keys found: {', '.join(map(str, rec))}"
    )


def e2e_prompt_ids(mr: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Context ids for one meaning representation: ``MR`` tokens + separator (BOS, else EOS)."""
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _eos_id(tokenizer)
    return _encode(tokenizer, mr.strip()) + [sep]


def e2e_examples(
    records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, *, max_length: int = 512
) -> TaskData:
    """Tokenize E2E records (``mr``/``ref``, or LoRA's ``context``/``completion``).

    ``input_ids = MR + sep + " " + ref + EOS``; labels are -100 on ``MR + sep``.
    """
    if not records:
        raise DataError("empty dataset (no records)")
    eos = _eos_id(tokenizer)
    pairs = [_with_record(_mr_ref, rec, i) for i, rec in enumerate(records)]
    mrs = list(dict.fromkeys(mr for mr, _ in pairs))  # an MR repeats once per reference
    prompts = {mr: e2e_prompt_ids(mr, tokenizer) for mr in mrs}
    refs = tokenizer([" " + ref for _, ref in pairs], add_special_tokens=False)["input_ids"]
    examples, skipped = [], 0
    for (mr, _), ref_ids in zip(pairs, refs, strict=True):
        ex = _example([(prompts[mr], False), (list(ref_ids) + [eos], True)], max_length)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    return TaskData(examples, skipped=skipped)


def group_references(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """E2E evaluation: distinct MR -> all its references, MRs in first-seen order."""
    groups: dict[str, list[str]] = {}
    for i, rec in enumerate(records):
        mr, ref = _with_record(_mr_ref, rec, i)
        groups.setdefault(mr, []).append(ref)
    return groups


# ---------------------------------------------------------------------------------------------
# table, loading, batching

TASKS: dict[str, Callable[..., TaskData]] = {
    "classification": classification_examples,
    "sft": sft_examples,
    "e2e": e2e_examples,
}
"""Task name -> ``fn(records, tokenizer, **kwargs) -> TaskData``."""


def load_task_data(
    path: str | Path, task: str, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
) -> TaskData:
    """Read one file and format it for ``task``; errors name the file."""
    if task not in TASKS:
        raise DataError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    records = read_records(path)
    try:
        return TASKS[task](records, tokenizer, **kwargs)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
