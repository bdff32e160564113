"""What every subcommand shares about its options: one-line parse errors, values read from files (``--config``
YAML, a run's ``run_args.json``) checked exactly as if typed on the command line, value types with ranges, and
output paths checked before anything runs."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """Bad command-line or config input (exit code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises :class:`UsageError` (one line) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


# ----- value types: argparse ``type=`` callables; their messages name the expected value ----------------------
def _number(kind: type, text: str, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """A random seed: what ``torch.manual_seed`` and the trainer accept, ``[0, 2**63)``."""
    value = _number(int, text, "an integer in [0, 2**63)")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def finite_float(text: str) -> float:
    return _number(float, text, "a number")


def positive_float(text: str) -> float:
    value = _number(float, text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def slice_mask(text: str) -> str:
    """``MODULE=1,0,1``: a fused projection adapted on the output slices marked 1 (kept as typed; see
    :func:`slice_masks`)."""
    name, sep, mask = text.partition("=")
    bits = [b.strip() for b in mask.split(",")]
    if not sep or not name.strip() or len(bits) < 2 or not set(bits) <= {"0", "1"} or "1" not in bits:
        raise argparse.ArgumentTypeError(f"expected MODULE=MASK with a mask of >= 2 comma-separated 0/1 and at "
                                         f"least one 1 (GPT-2's q and v: c_attn=1,0,1), got {text!r}")
    return text


def slice_masks(specs: list[str] | None) -> dict[str, list[bool]] | None:
    """``["c_attn=1,0,1"]`` -> ``{"c_attn": [True, False, True]}`` (``LoraConfig.slices``)."""
    if not specs:
        return None
    out = {}
    for spec in map(slice_mask, specs):
        name, _, mask = spec.partition("=")
        if name.strip() in out:
            raise UsageError(f"--slices names {name.strip()!r} twice")
        out[name.strip()] = [b.strip() == "1" for b in mask.split(",")]
    return out


def nullable(kind):
    """``kind``, or None for ``none`` / ``null`` (an optional value: ``--max-steps none``)."""

    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


# ----- values read from a file --------------------------------------------------------------------------------
def file_values(parser: argparse.ArgumentParser, values: Any, where: str, skip: tuple[str, ...] = ()) -> dict:
    """``{dest: value}`` from a mapping read from a file, each value checked and converted by its option's
    spec (type, choices, flag kind) as if typed on the command line. Unknown keys are refused by name."""
    if not isinstance(values, dict):
        raise UsageError(f"{where} must hold a mapping of option: value, found {type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", *skip)}
    out = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UsageError(f"{where}: unknown option {key!r}")
        try:
            out[dest] = _coerce(actions[dest], value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise UsageError(f"{where}: {key}: {e}") from None
    return out


def _coerce(action: argparse.Action, value: Any) -> Any:
    if action.nargs == 0:  # a switch (store_true / store_false / --x/--no-x): the file gives its value
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return str2bool(value)
        raise ValueError(f"expected true/false, got {value!r}")
    if value is None and action.default is None:
        return None  # an optional option left unset
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, v) for v in items]
    if isinstance(value, list) and action.type is None and all(_is_scalar(v) for v in value):
        value = ",".join(str(v) for v in value)  # a YAML list for a comma-list option
    return _scalar(action, value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _scalar(action: argparse.Action, value: Any) -> Any:
    if value is None:
        value = "none"  # accepted only by a nullable type
    if not _is_scalar(value):
        raise ValueError(f"expected a single value, got {type(value).__name__} {value!r}")
    text = str(value)
    kind = action.type
    if kind is None or kind is str:
        result = text
    else:
        try:
            result = kind(text)
        except argparse.ArgumentTypeError:
            raise
        except (TypeError, ValueError):
            raise ValueError(f"expected {getattr(kind, '__name__', 'a value')}, got {value!r}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}; got {value!r}")
    return result


# ----- paths ---------------------------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` can be (or become) a directory: it is not a file, no parent is a file, and it is writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a directory")
    _check_writable(path, option)
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` can be (re)written as a file: it is not a directory, no parent is a file, and it is writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory, not a file")
    _check_writable(path.absolute().parent, option, shown=path)
    return path


def _check_writable(path: Path, option: str, shown: Path | None = None) -> None:
    """The nearest existing of ``path`` and its parents is a writable directory."""
    shown = shown or path
    for parent in (path.absolute(), *path.absolute().parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {shown}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{option} {shown}: {parent} is not writable")
            return


# ----- options several subcommands share ----------------------------------------------------------------------
def add_base_quantize(p: argparse.ArgumentParser, default: str = "the one the adapter was trained on") -> None:
    """``--quantize`` for the commands that load a base under trained adapters (eval, generate, serve)."""
    from ..variants.quantized import PRESETS

    p.add_argument("--quantize", choices=[*sorted(PRESETS), "none"],
                   help=f"the base's 4/8-bit form (bitsandbytes); default: {default} (QLoRA adapters record it), "
                   "else full precision; none: full precision")
