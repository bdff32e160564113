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

A save writes ``checkpoint.tmp-<pid>/``, fsyncs it, moves the previous ``checkpoint/`` aside to
``checkpoint.old/``, renames the new one into place and deletes the old one. At every instant one
complete checkpoint exists: :func:`find_checkpoint` falls back to ``checkpoint.old/`` when a kill
landed between the two renames. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKPOINT = "checkpoint"
_OLD = "checkpoint.old"
_TMP_PREFIX = "checkpoint.tmp-"
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
    save_file(tensors, tmp / "trainable.safetensors", metadata={"format": "pt"})
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save({"ranks": rng, "epoch_generator": epoch_generator}, tmp / "rng.pt")
    doc = {"state": asdict(state), "scheduler": scheduler, "config": config}
    (tmp / STATE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    _fsync_tree(tmp)
    _swap_in(tmp, final, old)
    return final


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Replace ``final`` by ``tmp`` so that a complete checkpoint exists at every instant."""
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # ``final`` is complete, so ``old`` is stale
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


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
def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint under ``output_dir`` (``checkpoint/``, else a surviving ``checkpoint.old/``)."""
    root = Path(output_dir)
    for candidate in (root / CHECKPOINT, root / _OLD):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory (or an ``output_dir`` holding one). Never unpickles."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        found = find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no complete training checkpoint in {path}")
        path = found
    doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    rng = torch.load(path / "rng.pt", weights_only=True)
    return Checkpoint(
        path=path,
        state=TrainState(**doc["state"]),
        trainable=load_file(path / "trainable.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler=doc["scheduler"],
        rng=rng["ranks"],
        epoch_generator=rng["epoch_generator"],
        config=doc.get("config", {}),
    )
