"""The adapters a server knows, and the ones loaded: an LRU bounded by ``max_loaded`` over one base model.

Known adapters come from ``--adapter NAME=DIR`` and from the subfolders of ``--adapters-dir`` (listed at
once, loaded on first use); dynamic loads may read only inside ``--adapters-dir`` (a relative path, or an
absolute one that resolves inside it). Loading goes through
:func:`lorakit.load_adapter` (validated before the model changes) and then into the resident
:class:`~lorakit.ops.pool.AdapterPool`; eviction is the reverse. An adapter that fails to load (corrupt,
made for another base) is remembered with its error: its requests fail with that error, the others run.
Only the engine's thread calls :meth:`AdapterStore.ensure` / :meth:`AdapterStore.evict` (they change the model).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from ..core.config import LORAKIT_KEY
from ..core.model import delete_adapter
from ..core.tables import METADATA
from ..models import HEAD_WEIGHTS
from ..ops.pool import AdapterPool
from .errors import AdapterLoadFailed, AdapterNotFound, Conflict, InvalidRequest, PathRefused

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
VOCAB_KEYS = ("added_tokens", "vocab_size")  # lorakit metadata of adapters with trainable tokens


@dataclass
class AdapterInfo:
    name: str
    path: Path
    rank: int | None = None
    target_modules: list[str] | None = None
    size_bytes: int | None = None
    labels: list[str] | None = None
    num_classes: int | None = None  # outputs of the adapter's own classification head (1: regression); None: none
    vocab: dict = field(default_factory=dict)  # the tokens it added and its vocabulary size (trainable tokens)
    error: str | None = None
    stats: dict = field(default_factory=dict)


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def describe(name: str, path: Path) -> AdapterInfo:
    """Rank, targets, size and class names from the adapter's files (config read, weights not loaded)."""
    info = AdapterInfo(name, path)
    try:
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        info.rank = int(raw["r"]) if isinstance(raw.get("r"), int) else None
        targets = raw.get("target_modules")
        info.target_modules = [targets] if isinstance(targets, str) else list(targets or [])
        info.size_bytes = (path / WEIGHTS_NAME).stat().st_size
        meta, info.num_classes = _header(path, raw)
        info.vocab = _vocabulary(meta)
        id2label = meta.get("id2label") or {}
        info.labels = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        info.error = str(e) if isinstance(e, ValueError) and WEIGHTS_NAME in str(e) else f"{path / CONFIG_NAME}: {e}"
    return info


def _header(path: Path, raw: dict) -> tuple[dict, int | None]:
    """lorakit's metadata (in the weights file's header, or, in older adapters, in ``adapter_config.json``) and
    the number of outputs of the adapter's own classification head (None: it has none), read without loading
    the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
            header = f.metadata() or {}
            head = next((k for k in f.keys() if k.endswith(HEAD_WEIGHTS)), None)
            classes = f.get_slice(head).get_shape()[0] if head else None
    except Exception as e:  # noqa: BLE001 -- safetensors' own error type; reported with the adapter
        raise ValueError(f"{path / WEIGHTS_NAME}: not a readable safetensors file: {e}") from None
    meta = json.loads(header[LORAKIT_KEY]) if LORAKIT_KEY in header else raw.get(LORAKIT_KEY)
    return (meta if isinstance(meta, dict) else {}), classes


def _vocabulary(meta: dict) -> dict:
    """``added_tokens`` and ``vocab_size`` of lorakit's metadata, checked as a load checks them."""
    vocab = {k: meta[k] for k in VOCAB_KEYS if k in meta}
    bad = next((k for k, v in vocab.items() if not METADATA[k](v)), None)
    if bad:
        raise ValueError(f"lorakit metadata {bad!r} is not valid: {str(vocab[bad])[:80]}")
    return vocab


def vocabulary_refusal(info: AdapterInfo, tokenizer, rows: int) -> str:
    """Why ``info``'s adapter cannot join a running server's vocabulary ("" when it can): the tokens it added
    must be there with the same ids, its vocabulary no larger than the ``rows`` of the embeddings. The
    vocabulary is fixed when the server starts (the embeddings cannot grow under running requests)."""
    have = tokenizer.get_vocab()
    restart = "the vocabulary is fixed at start: put the adapter in --adapters-dir and restart the server"
    for token, i in sorted((info.vocab.get("added_tokens") or {}).items(), key=lambda kv: kv[1]):
        if have.get(token) != i:
            now = f"has it as id {have[token]}" if token in have else "does not hold it"
            return f"adapter {info.name!r} was trained with token {token!r} as id {i}; this server {now} ({restart})"
    if (info.vocab.get("vocab_size") or 0) > rows:
        return (f"adapter {info.name!r} was trained with {info.vocab['vocab_size']} embedding rows; this server has "
                f"{rows} ({restart})")
    return ""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise PathRefused(f"adapter name {name!r} is not allowed: use letters, digits, '_', '.', ':', '-'",
                          "lora_name")
    return name


def resolve_inside(root: Path | None, path: str) -> Path:
    """The adapter folder ``path`` names (relative to ``root``, or absolute) if it lies inside ``root`` once
    symlinks are followed on both; otherwise :class:`PathRefused` (also for a path that cannot exist)."""
    if root is None:
        raise PathRefused("dynamic adapter loading needs --adapters-dir (the only root it may read from)", "lora_path")
    shown = path if len(path) <= 80 else path[:77] + "..."
    if "\x00" in path:
        raise PathRefused(f"lora_path {shown!r} holds a NUL character", "lora_path")
    if path.startswith("~"):
        raise PathRefused(f"lora_path {shown!r}: '~' is not expanded; give a path inside --adapters-dir", "lora_path")
    try:
        real_root = root.resolve()
        target = (real_root / path).resolve()  # an absolute path replaces the root
        inside = target == real_root or real_root in target.parents
        found = inside and is_adapter_dir(target)
    except (OSError, ValueError, RuntimeError) as e:  # too long, a symlink loop, ...
        raise PathRefused(f"lora_path {shown!r} cannot be opened: {e.strerror if isinstance(e, OSError) else e}",
                          "lora_path") from None
    if not inside:
        raise PathRefused(f"lora_path {shown!r} leads outside --adapters-dir", "lora_path")
    if not found:
        raise PathRefused(f"lora_path {shown!r}: no {CONFIG_NAME} + {WEIGHTS_NAME} there", "lora_path")
    return target


def discover(base_name: str, adapters: dict[str, Path] | None = None,
             adapters_dir: Path | None = None) -> dict[str, AdapterInfo]:
    """The adapters a server knows at start: each subfolder of ``adapters_dir`` holding an adapter (under the
    folder's name; symlinks out of the root are not served) and each ``NAME=DIR`` of ``adapters``."""
    known: dict[str, AdapterInfo] = {}
    if adapters_dir is not None:
        root = Path(adapters_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--adapters-dir {root} is not a directory")
        for sub in sorted(root.iterdir()):
            if not NAME_RE.fullmatch(sub.name) or not is_adapter_dir(sub):
                continue
            try:
                known[sub.name] = describe(sub.name, resolve_inside(root, sub.name))
            except PathRefused:
                continue
    for name, path in (adapters or {}).items():
        check_name(name)
        if name == base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name")
        if not is_adapter_dir(Path(path)):
            raise FileNotFoundError(f"adapter {name}: no {CONFIG_NAME} + {WEIGHTS_NAME} in {path}")
        known[name] = describe(name, Path(path))
    return known


class AdapterStore:
    """Known and loaded adapters of one base ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, base_name: str, known: dict[str, AdapterInfo],
                 adapters_dir: Path | None = None, max_loaded: int = 8, tokenizer=None):
        if max_loaded < 1:
            raise ValueError(f"--max-loaded-adapters must be >= 1, got {max_loaded}")
        self.model, self.base_name, self.max_loaded = model, base_name, max_loaded
        self.tokenizer = tokenizer  # checks the tokens of adapters added while running (None: not checked)
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.known = dict(known)
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.pool = AdapterPool(model, slots=max_loaded)

    def names(self) -> list[str]:
        return list(self.known)

    def info(self, name: str | None) -> AdapterInfo | None:
        """None for the base model; :class:`AdapterNotFound` naming what exists for anything else unknown."""
        if name == self.base_name:
            return None
        if name not in self.known:
            raise AdapterNotFound(f"model {name!r} does not exist; available: {[self.base_name, *self.known]}")
        return self.known[name]

    def own_head(self, name: str | None) -> bool:
        """Whether rows of ``name`` run the adapter's own classification head (else the base model's)."""
        info = self.known.get(name) if name is not None else None
        return info is not None and info.num_classes is not None

    def num_classes(self, name: str | None) -> int:
        """Outputs of the head that rows of ``name`` run: the adapter's own, else the base model's."""
        return self.known[name].num_classes if self.own_head(name) else self.model.config.num_labels

    # ----- engine thread only -------------------------------------------------------------------------------
    def ensure(self, name: str | None, pinned: set[str]) -> bool:
        """Load ``name`` if needed (evicting the least recently used adapter not in ``pinned``).

        Returns False when every loaded adapter is pinned (the caller retries later). Raises
        :class:`AdapterLoadFailed` if the adapter cannot be loaded.
        """
        if name is None:  # the base model
            return True
        info = self.info(name)
        if info is None:
            return True
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return True
        if info.error:
            raise AdapterLoadFailed(f"adapter {name!r} cannot be loaded: {info.error}")
        while len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if n not in pinned), None)
            if victim is None:
                return False
            self.evict(victim)
        try:
            load_adapter(self.model, info.path, adapter=name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            info.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AdapterLoadFailed(f"adapter {name!r} cannot be loaded: {info.error}") from None
        self.pool.add(name)
        self.loaded[name] = None
        return True

    def evict(self, name: str) -> None:
        if name in self.loaded:
            del self.loaded[name]
            self.pool.remove(name)
            delete_adapter(self.model, name)

    def add(self, name: str, rel_path: str) -> AdapterInfo:
        """Dynamic load: register ``name`` at ``rel_path`` inside ``--adapters-dir`` (loaded on first use)."""
        check_name(name)
        if name == self.base_name or name in self.known:
            raise InvalidRequest(f"adapter {name!r} already exists; unload it first", "lora_name")
        info = describe(name, resolve_inside(self.adapters_dir, rel_path))
        why = vocabulary_refusal(info, self.tokenizer, self.model.get_input_embeddings().weight.shape[0]) \
            if self.tokenizer is not None and not info.error else ""
        if why:
            raise InvalidRequest(why, "lora_path")
        self.known[name] = info
        return info

    def remove(self, name: str, in_use: set[str]) -> None:
        if name == self.base_name or name not in self.known:
            raise AdapterNotFound(f"adapter {name!r} does not exist; available: {list(self.known)}", "lora_name")
        if name in in_use:
            raise Conflict(f"adapter {name!r} is running requests; retry when they finish", "lora_name")
        self.evict(name)
        del self.known[name]
