"""Reading dataset files into plain records (``list[dict]``).

Formats, chosen by file suffix:

- ``.jsonl``: one JSON object per line.
- ``.json``: one JSON array of objects.
- ``.csv`` / ``.tsv``: delimited text, with or without a header row. TSV is read without
  quote handling (GLUE files hold unbalanced ``"`` characters). GLUE layouts are recognised:
  SST-2 ``sentence,label``; MRPC ``Quality,#1 ID,#2 ID,#1 String,#2 String`` (with a UTF-8
  BOM); RTE ``index,sentence1,sentence2,label``; CoLA headerless ``source,label,mark,sentence``.
- ``.txt``: E2E lines ``<MR>||<reference>`` -> ``{"mr": ..., "ref": ...}``.

Every problem with the input raises :class:`DataError` with a one-line message that names the
file and, where there is one, the line.

Tokenized examples (built by :mod:`lorakit.train.tasks`) travel in a :class:`TaskData`;
:func:`collate` right-pads a list of them into LongTensors.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "SPLIT_NAMES",
    "SUFFIXES",
    "TaskData",
    "collate",
    "default_data_dir",
    "label_names_in",
    "read_records",
    "resolve_splits",
]

SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".tsv", ".txt")
"""File suffixes :func:`read_records` understands."""

IGNORE_INDEX = -100
"""Label value that cross-entropy ignores (prompt tokens, padding)."""

SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "validation", "valid", "val"),
    "test": ("test",),
}
"""Canonical split name -> file stems accepted for it, in order of preference."""

# Headerless layouts recognised by their shape (see _headerless_columns).
_COLA_COLUMNS = ("source", "label", "mark", "sentence")


class DataError(ValueError):
    """Bad dataset input: missing file or column, bad label, empty data, undecodable bytes."""


@dataclass
class TaskData:
    """Tokenized examples plus what the caller needs to build the model and report.

    Attributes:
        examples: one dict per example (``input_ids``, ``attention_mask``, ``labels``, ...).
        label_names: classification only: label id -> name.
        skipped: examples dropped because truncation left them no loss tokens.
    """

    examples: list[dict[str, Any]]
    label_names: list[str] | None = None
    skipped: int = 0

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), else ``None``."""
        return None if self.label_names is None else len(self.label_names)


def default_data_dir() -> Path:
    """Directory of the packaged SST-2 slice (``train.tsv`` + ``dev.tsv``) used by the demo."""
    return Path(__file__).resolve().parent.parent / "data" / "sst2"


LABELS_FILE = "labels.txt"
"""In a data directory: the class names, one per line, class ``i`` on line ``i + 1``."""


def label_names_in(path: str | Path) -> list[str] | None:
    """The class names a data directory declares in :data:`LABELS_FILE` (None: no such file, or a file path).

    Integer labels then index into them (the packaged SST-2: ``0`` negative, ``1`` positive), so the adapter
    records names rather than ``0``/``1``.

    Raises:
        DataError: the file is empty, has a blank line, or names a class twice.
    """
    file = Path(path) / LABELS_FILE
    if not Path(path).is_dir() or not file.is_file():
        return None
    names = [n.strip() for n in _read_text(file).splitlines()]  # compared as they are used: stripped
    blank = next((i + 1 for i, n in enumerate(names) if not n), None)
    if not names or blank is not None:
        raise DataError(f"{file}: {'empty' if not names else f'line {blank} is blank'}; write one class name a line")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{file}: class names {repeated} appear more than once")
    return names


def resolve_splits(path: str | Path) -> dict[str, Path]:
    """Map split names (``train``, ``dev``, ``test``) to files.

    A file is returned as ``{"train": path}``. A directory is searched for ``<stem><suffix>``
    with a stem from :data:`SPLIT_NAMES` (``validation``, ``valid`` and ``val`` count as
    ``dev``) and a suffix from :data:`SUFFIXES`.

    Raises:
        DataError: the path does not exist, a split has more than one candidate file, or the
            directory holds no split file at all.
    """
    path = Path(path)
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise DataError(f"data path not found: {path}")
    files = {p.name: p for p in path.iterdir() if p.is_file()}
    splits: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        found = [files[s + x] for s in stems for x in SUFFIXES if s + x in files]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: more than one file for split '{split}': {names}")
        if found:
            splits[split] = found[0]
    if not splits:
        listing = ", ".join(sorted(files)) or "nothing"
        raise DataError(
            f"{path}: no train/dev/test file (expected e.g. train.jsonl, dev.tsv); found: {listing}"
        )
    return splits


def read_records(
    path: str | Path,
    *,
    header: bool | None = None,
    columns: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read one dataset file into a list of records.

    Args:
        path: a ``.jsonl``, ``.json``, ``.csv``, ``.tsv`` or E2E ``.txt`` file.
        header: CSV/TSV only: whether the first row is a header; ``None`` detects it.
        columns: CSV/TSV only: column names to use for headerless files (overrides detection).

    Returns:
        Records as dicts. CSV/TSV values are whitespace-stripped strings.

    Raises:
        DataError: missing file, unknown suffix, invalid UTF-8, malformed JSON, ragged rows,
            or no records.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected one of {', '.join(SUFFIXES)})")
    text = _read_text(path)
    if suffix == ".jsonl":
        records = _parse_jsonl(text, path)
    elif suffix == ".json":
        records = _parse_json(text, path)
    elif suffix == ".txt":
        records = _parse_e2e(text, path)
    else:
        records = _parse_delimited(text, path, "\t" if suffix == ".tsv" else ",", header, columns)
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    return records


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into LongTensors.

    ``input_ids`` pad with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` and
    ``token_type_ids`` with 0; int fields (classification ``labels``) stack to shape ``(B,)``.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    if not batch:
        raise ValueError("empty batch")
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [ex[key] for ex in batch]
        if isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)  # (B,)
            continue
        pad = {"labels": IGNORE_INDEX, "attention_mask": 0, "token_type_ids": 0}.get(key, pad_token_id)
        width = max(len(v) for v in values)
        t = torch.full((len(values), width), pad, dtype=torch.long)  # (B, T)
        for row, v in enumerate(values):
            t[row, : len(v)] = torch.tensor(v, dtype=torch.long)
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------
# helpers


def _read_text(path: Path) -> str:
    """Decode a file as UTF-8 (a leading BOM is dropped); name the byte offset on failure."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(f"{path}: invalid UTF-8 at byte offset {offset} (line {line})") from None


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON on line {lineno}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, expected an object")
        records.append(obj)
    return records


def _parse_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON on line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects, got a JSON {type(obj).__name__}")
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: item {i} is a JSON {type(rec).__name__}, expected an object")
    return obj


def _parse_e2e(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        mr, sep, ref = line.partition("||")
        if not sep:
            raise DataError(f"{path}: line {lineno} has no '||' separator (expected '<MR>||<reference>')")
        records.append({"mr": mr.strip(), "ref": ref.strip()})
    return records


def _parse_delimited(
    text: str, path: Path, delimiter: str, header: bool | None, columns: Sequence[str] | None
) -> list[dict[str, Any]]:
    if delimiter == "\t":
        # GLUE TSVs are not quoted: split on tabs only, keeping '"' characters as text.
        rows = [line.rstrip("\r").split("\t") for line in text.split("\n")]
        numbered = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        numbered = []
        try:
            for r in reader:
                if any(c.strip() for c in r):
                    numbered.append((reader.line_num, r))
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV on line {reader.line_num}: {e}") from None
    if not numbered:
        return []
    first = [c.strip() for c in numbered[0][1]]
    if columns is not None:
        names = list(columns)
        has_header = header if header is not None else first == names
    else:
        has_header = header if header is not None else _looks_like_header(first)
        names = first if has_header else _headerless_columns(first)
    if has_header:
        numbered = numbered[1:]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate column names in header: {', '.join(names)}")
    records = []
    for lineno, row in numbered:
        if len(row) != len(names):
            raise DataError(
                f"{path}: line {lineno} has {len(row)} fields, expected {len(names)} ({', '.join(names)})"
            )
        records.append({n: c.strip() for n, c in zip(names, row, strict=True)})
    return records


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _looks_like_header(row: list[str]) -> bool:
    """A header row has distinct, non-empty, non-numeric cells (``sentence, label``)."""
    if _is_cola_row(row):
        return False
    return all(row) and len(set(row)) == len(row) and not any(_is_number(c) for c in row)


def _is_cola_row(row: list[str]) -> bool:
    """CoLA's headerless layout: ``source, 0|1, mark, sentence``."""
    return (
        len(row) == 4
        and row[1] in ("0", "1")
        and not _is_number(row[0])
        and set(row[2].strip()) <= set("*?#")
    )


def _headerless_columns(row: list[str]) -> list[str]:
    """Column names for a headerless file, from the shape of its first row."""
    if _is_cola_row(row):
        return list(_COLA_COLUMNS)
    if len(row) == 1:
        return ["text"]
    if len(row) == 2:
        return ["label", "text"] if _is_number(row[0]) and not _is_number(row[1]) else ["text", "label"]
    if len(row) == 3:
        return ["text", "text_pair", "label"]
    return [f"col{i}" for i in range(len(row))]
