"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

``output_dir/checkpoint/`` holds:

- ``trainable.safetensors``: every trainable parameter under its ``named_parameters`` name (LoRA A/B,
  trained biases, ``modules_to_save`` copies), so restoring is an exact copy;
- ``adapter/``: the same weights as a PEFT-format adapter (:func:`lorakit.save_adapter`), usable as is;
- ``optimizer.pt``: the optimizer state dict (``torch.save``; read back with ``weights_only=True``);
- ``rng.pt``: RNG states (torch CPU, CUDA, python ``random``, numpy; one entry per rank) and the
  sampler generator's state at the start of the current epoch;
- ``trainer_state.json``: step, data position, best metric, early-stopping counter, scheduler state,
  the :class:`~lorakit.train.loop.TrainConfig`. Written last: its presence marks a complete checkpoint.

A save writes ``checkpoint.tmp-<pid>/``, fsyncs it, reads every file back and compares the tensors
(a write that does not verify never replaces anything), then moves ``checkpoint/`` to ``checkpoint.old/``
and renames the new one into place. ``checkpoint.old/`` (the previous good checkpoint) is kept: at every
instant one complete checkpoint exists (a kill between the two renames leaves ``checkpoint.old/``), and a
resume falls back to it when ``checkpoint/`` turns out damaged (see :func:`checkpoint_candidates`).
Reading never unpickles; every problem raises :class:`~lorakit.core.checkpoint.CheckpointError` naming the
file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.checkpoint import CheckpointError
from ..files import atomic_write
from .config import check_type

CHECKPOINT = "checkpoint"
_OLD = "checkpoint.old"
_TMP_PREFIX = "checkpoint.tmp-"
DAMAGED = "checkpoint.damaged"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where a run stands; ``epoch_step`` counts optimizer steps done inside epoch ``epoch``."""

    global_step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    state: TrainState
    trainable: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # one per rank
    epoch_generator: Tensor  # sampler generator state at the start of ``state.epoch``
    config: dict[str, Any]


# ----- RNG ------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if initialised, python random, numpy if imported)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_tensors(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return out


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(states["torch"])
    random.setstate(_py_state_from_tensors(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np = _numpy()
    if np is not None and "numpy" in states:
        s = states["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


def _py_state_to_tensors(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensors(d: dict[str, Any]) -> tuple:
    return d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"]


def _numpy():
    import sys

    return sys.modules.get("numpy")  # only if something imported it: then it may hold RNG state


# ----- save ----------------------------------------------------------------------------------------------
def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    state: TrainState,
    trainable: dict[str, Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    rng: list[dict[str, Any]],
    epoch_generator: Tensor,
    config: dict[str, Any],
    write_adapter: Callable[[Path], object] | None = None,
) -> Path:
    """Write a complete checkpoint to ``output_dir/checkpoint/`` atomically; returns its path."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, old, tmp = root / CHECKPOINT, root / _OLD, root / f"{_TMP_PREFIX}{os.getpid()}"
    for stale in root.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in trainable.items()}
    save_file(tensors, tmp / "trainable.safetensors", metadata={"format": "pt"})  # one key: fixed order
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save({"ranks": rng, "epoch_generator": epoch_generator}, tmp / "rng.pt")
    doc = {"state": asdict(state), "scheduler": scheduler, "config": config}
    (tmp / STATE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    _fsync_tree(tmp)
    _verify(tmp, tensors)
    _swap_in(tmp, final, old)
    return final


def _verify(path: Path, tensors: dict[str, Tensor]) -> None:
    """Every file of the checkpoint at ``path`` reads back, and its tensors are the ones written."""
    back = load_checkpoint(path)
    if set(back.trainable) != set(tensors) or not all(torch.equal(back.trainable[k], t) for k, t in tensors.items()):
        raise CheckpointError(f"{path / 'trainable.safetensors'}: read back different tensors than were written")


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Replace ``final`` by ``tmp``, keeping ``final`` as ``old`` (the fallback): a complete checkpoint
    exists at every instant."""
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # ``final`` is complete, so ``old`` is no longer needed
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def set_aside(path: str | os.PathLike) -> Path:
    """Move a damaged checkpoint directory to ``checkpoint.damaged/`` beside it (replacing an older one), so
    the next save keeps the good ``checkpoint.old/``; returns the new path."""
    path = Path(path)
    target = path.parent / DAMAGED
    if target.exists():
        shutil.rmtree(target)
    os.rename(path, target)
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory and a rename: a reader (or a kill)
    sees the old file or the new one, never a truncated one."""
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [p for p in path.rglob("*") if p.is_dir()] + [path]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- load ----------------------------------------------------------------------------------------------
def checkpoint_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under ``output_dir``, newest first: ``checkpoint/``, then ``checkpoint.old/``
    (the previous one, kept as a fallback). ``output_dir`` may also be a checkpoint directory itself."""
    root = Path(output_dir)
    if (root / STATE_FILE).is_file():
        return [root]
    return [c for c in (root / CHECKPOINT, root / _OLD) if (c / STATE_FILE).is_file()]


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir`` (``checkpoint/``, else ``checkpoint.old/``)."""
    found = checkpoint_candidates(output_dir)
    return found[0] if found else None


def read_state(path: str | os.PathLike) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """``(state, scheduler, config)`` from a checkpoint directory's ``trainer_state.json``, checked."""
    file = Path(path) / STATE_FILE
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict) or not isinstance(doc.get("scheduler"),
                                                                                               dict):
        raise CheckpointError(f"{file}: expected an object with 'state' and 'scheduler' objects")
    known = {f for f in TrainState.__dataclass_fields__}
    unknown = sorted(set(doc["state"]) - known)
    if unknown:
        raise CheckpointError(f"{file}: unknown state keys {unknown}")
    hints = typing.get_type_hints(TrainState)
    try:
        for key, value in doc["state"].items():
            check_type(key, value, hints[key])
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    state = TrainState(**doc["state"])
    if min(state.global_step, state.epoch, state.epoch_step, state.bad_evals) < 0 or not isinstance(
            doc["scheduler"].get("last_epoch"), int):
        raise CheckpointError(f"{file}: negative counters or no scheduler position")
    config = doc.get("config", {})
    return state, doc["scheduler"], config if isinstance(config, dict) else {}


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint directory (or the newest in an ``output_dir``). Never unpickles; a
    missing, truncated or malformed file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        found = find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no complete training checkpoint in {path}")
        path = found
    state, scheduler, config = read_state(path)
    file = path / "trainable.safetensors"
    try:
        trainable = load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__})") from None
    optimizer = _torch_file(path / "optimizer.pt")
    if not (isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        raise CheckpointError(f"{path / 'optimizer.pt'}: not an optimizer state dict (state, param_groups)")
    rng = _torch_file(path / "rng.pt")
    ranks, generator = rng.get("ranks"), rng.get("epoch_generator")
    if not (isinstance(ranks, list) and ranks and all(isinstance(r, dict) and isinstance(r.get("torch"), Tensor)
                                                       and isinstance(r.get("python"), dict) for r in ranks)
            and isinstance(generator, Tensor) and generator.dtype == torch.uint8):
        raise CheckpointError(f"{path / 'rng.pt'}: not a lorakit RNG state (ranks, epoch_generator)")
    return Checkpoint(path=path, state=state, trainable=trainable, optimizer=optimizer, scheduler=scheduler,
                      rng=ranks, epoch_generator=generator, config=config)


def _torch_file(file: Path) -> dict[str, Any]:
    """A ``torch.save``d dict, read with ``weights_only=True``. torch's own message is not passed on: for a
    file it cannot read safely it suggests ``weights_only=False``, which must never be done with it. Nor are its
    warnings and prints while reading ("Detected pickle protocol 4 ... please file an issue" for a damaged file):
    the caller's one-line error or notice is the whole report."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            value = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 (any failure means the same: the file is damaged)
        raise CheckpointError(f"{file}: not a readable checkpoint file ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a dict, found {type(value).__name__}")
    return value
