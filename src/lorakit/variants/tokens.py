"""Trainable tokens (PEFT's ``trainable_token_indices``): train chosen rows of an embedding and nothing else of it.

For new special tokens (a chat template's ``<|im_start|>``, tool-call markers) the rows that matter are the new
ones: training the whole ``(vocab, dim)`` table costs memory and optimizer state for rows that should not move.
A :class:`TokenAdapter` holds, for token ids ``idx`` (n,), the trained rows ``R`` (n, dim); with the base table
``W`` (vocab, dim) the layer runs on ``W'``::

    W'[idx] = R,  W'[j] = W[j] elsewhere       # rows replaced, not added to (PEFT's choice: a row that
                                               # resize_token_embeddings drew at random is overwritten, so the
                                               # result does not depend on that draw)
    embedding:        out[t] = R[slot(x_t)] if x_t in idx else W[x_t]
    tied output head: logits[..., idx] = h @ R.T (+ bias[idx])       h: (..., dim), R.T: (dim, n)

``R`` starts as ``W[idx]``, so a new adapter leaves the outputs unchanged. An output head whose weight *is* the
embedding's (tied input/output embeddings) gets a tied adapter sharing ``R``: the logits of the trained tokens
follow their new embeddings, as in PEFT. Merging writes ``R`` into the rows (unmerge writes the originals back).

Checkpoints use PEFT's layouts: beside LoRA (``LoraConfig.trainable_token_indices``) the rows are
``<module path>.token_adapter.trainable_tokens_delta``; alone (``target_modules=[]``) the adapter is written as
PEFT's ``TRAINABLE_TOKENS`` config with ``<module path>.trainable_tokens_delta``. A tied head saves nothing of
its own (PEFT's ``TRAINABLE_TOKENS`` files also hold the tied copy; it is read and checked equal).

Registered into core's tables (:mod:`lorakit.core.tables`) by :func:`register`, which
:func:`lorakit.variants.register` calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core import tables
from ..core.checkpoint import PREFIX
from ..core.config import LORAKIT_KEY, LoraConfig, module_matches, short_repr
from ..core.layers import LoraLayer
from ..core.saved import SavedModule
from ..core.targets import find_modules_to_save, outside_adapters

DELTA = "trainable_tokens_delta"  # PEFT's name for the trained rows (they replace the base rows; not a difference)
LORA_KEY = f"token_adapter.{DELTA}"  # beside LoRA: <module path>.token_adapter.trainable_tokens_delta


class TokenAdapter(nn.Module):
    """One adapter's trained rows on one layer: ``trainable_tokens_delta`` (n, dim) for ids ``token_indices``."""

    additive = False  # not a B·A update: combine_adapters refuses it by name
    row_batched = False  # nothing to stack for the per-row path's batched matmuls ...
    row_wise = True  # ... but row i's output depends on row i alone: per-row batches run it on its rows

    def __init__(self, indices: Tensor, rows: Tensor, config: LoraConfig, num_rows: int):
        super().__init__()
        self.config = config
        self.tied = False
        self.added_tokens: dict[str, int] | None = None  # token -> id, recorded by whoever added them
        self.trainable_tokens_delta = nn.Parameter(rows.detach().clone())
        self.register_buffer("token_indices", indices, persistent=False)
        self.register_buffer("trainable_tokens_original", rows.detach().clone(), persistent=False)
        slot = torch.full((num_rows,), -1, dtype=torch.long, device=indices.device)
        slot[indices] = torch.arange(len(indices), device=indices.device)
        self.register_buffer("slot_of", slot, persistent=False)  # token id -> row of R, -1 for untrained ids

    @classmethod
    def tied_to(cls, source: TokenAdapter) -> TokenAdapter:
        """The adapter of a layer whose weight is ``source``'s layer's weight: the same ``R`` (one Parameter)."""
        tied = cls(source.token_indices, source.trainable_tokens_original, source.config, source.slot_of.numel())
        tied.trainable_tokens_delta = source.trainable_tokens_delta
        tied.tied = True
        return tied

    @property
    def dtype(self) -> torch.dtype:
        return self.trainable_tokens_delta.dtype

    # ----- the adapter seam core's LoraLayer calls ------------------------------------------------------------
    def layer_output(self, layer: TokenLayer, out: Tensor, x: Tensor, inplace: bool) -> Tensor:
        return layer.with_rows(out, x, self)

    def merged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """The fp32 table with the trained rows written in (rows are dim 0 of an embedding and of a head)."""
        rows = self.trainable_tokens_delta.detach().float().to(weight.device)
        return weight.index_copy(0, self.token_indices.to(weight.device), rows)

    def unmerged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        rows = self.trainable_tokens_original.float().to(weight.device)
        return weight.index_copy(0, self.token_indices.to(weight.device), rows)

    def export_tensors(self) -> dict[str, Tensor]:
        """Checkpoint tensors by key suffix (PEFT's LoRA layout); a tied adapter's rows are its source's."""
        return {} if self.tied else {LORA_KEY: self.trainable_tokens_delta}

    def extra_tensors(self) -> dict[str, Tensor]:
        return {}  # everything it saves is in export_tensors

    def export_pattern(self, alpha: float) -> None:
        return None  # no rank: token layers are not in target_modules / rank_pattern

    def export_metadata(self) -> dict[str, Any]:
        """What a loader needs to rebuild the vocabulary: the table's size and the tokens added to it."""
        if self.tied:
            return {}
        return {"vocab_size": self.slot_of.numel(), **({"added_tokens": self.added_tokens} if self.added_tokens else {})}


class TokenLayer(LoraLayer):
    """A layer whose weight rows are the vocabulary, holding :class:`TokenAdapter` s (never LoRA pairs)."""

    lora_target = False  # not listed in target_modules: trainable_token_indices names it

    def make_adapter(self, r, scaling, config, module_name):
        raise ValueError(f"{module_name} trains token rows (trainable_token_indices); LoRA cannot adapt it as well")

    def file_slots(self, adapter: TokenAdapter) -> dict[str, tuple[Tensor, bool]]:
        return {k: (v.data, False) for k, v in adapter.export_tensors().items()}

    def with_rows(self, out: Tensor, x: Tensor, adapter: TokenAdapter) -> Tensor:
        raise NotImplementedError


class TokenEmbedding(TokenLayer):
    """``nn.Embedding``: positions holding a trained id take its row of ``R``."""

    def with_rows(self, out, x, adapter):
        slot = adapter.slot_of[x]  # (...,)
        rows = adapter.trainable_tokens_delta[slot.clamp(min=0)]  # (..., dim)
        scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale in forward
        if isinstance(scale, Tensor | float):
            rows = rows * (scale.to(rows.dtype) if isinstance(scale, Tensor) else scale)
        return torch.where((slot >= 0).unsqueeze(-1), rows.to(out.dtype), out)


class TokenHead(TokenLayer):
    """``nn.Linear`` output head (weight ``(vocab, dim)``): the logits of the trained ids come from ``R``."""

    def with_rows(self, out, x, adapter):
        R = adapter.trainable_tokens_delta
        cols = x.to(R.dtype) @ R.T  # (..., dim) @ (dim, n) -> (..., n)
        if self.base_layer.bias is not None:
            cols = cols + self.base_layer.bias[adapter.token_indices]
        return out.index_copy(-1, adapter.token_indices, cols.to(out.dtype))


#: base type -> wrapper (a subclass of nn.Embedding / nn.Linear matches too)
LAYERS: list[tuple[type, type[TokenLayer]]] = [(nn.Embedding, TokenEmbedding), (nn.Linear, TokenHead)]


# ----- planning: which layers, which rows, ties ------------------------------------------------------------
def plan_tokens(model: nn.Module, config: LoraConfig, name: str, lora_paths: list[str]) -> list[tuple]:
    """core's ``EXTRA_LAYERS`` entry: the token layers and adapters of ``config`` (the model is not touched)."""
    spec = config.trainable_token_indices
    if spec is None:
        return []
    targets = _resolve(model, spec)
    tables = _tables(model)
    tied = {p: [q for q, w in tables.items() if q != p and w is tables[p]] for p in targets}
    for path, others in tied.items():
        for other in others:
            if other in targets and targets[other] != targets[path]:
                raise ValueError(f"trainable_token_indices: {other!r} is tied to {path!r} (one weight); give both the "
                                 f"same token ids, got {targets[other]} and {targets[path]}")
    first = sorted(targets, key=lambda p: (not isinstance(_base(model.get_submodule(p)), nn.Embedding), p))
    sources = [p for i, p in enumerate(first) if not any(q in first[:i] for q in tied[p])]  # one per tied group
    saved = find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    entries = []
    for path in sources:
        group = [path, *tied[path]]
        for p in group:
            _check_target(model, p, lora_paths, saved)
        source = None
        for p in group:
            layer, new = _wrapper(model, p)
            w = layer.base_layer.weight
            ids = targets[path]
            if max(ids) >= w.shape[0]:
                raise ValueError(f"trainable_token_indices: token id {max(ids)} is out of range for {p!r} "
                                 f"({w.shape[0]} rows); resize the embeddings first")
            if source is None:
                idx = torch.tensor(ids, dtype=torch.long, device=w.device)
                source = TokenAdapter(idx, w.detach()[idx], config, w.shape[0])
                entries.append((p, layer, source, new))
            else:
                entries.append((p, layer, TokenAdapter.tied_to(source), new))
    return entries


def _resolve(model: nn.Module, spec: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """``trainable_token_indices`` -> {module path: token ids}; a list means the input embedding."""
    modules = [(p, m) for p, m in outside_adapters(model) if p]
    if isinstance(spec, list):
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        found = [p for p, m in modules if m is emb] if emb is not None else \
            [p for p, m in modules if isinstance(_base(m), nn.Embedding) and not p.endswith(".base_layer")]
        if len(found) != 1:
            raise ValueError(f"trainable_token_indices as a list needs one input embedding, found {found or 'none'}; "
                             "name the layer: {'<module name>': [ids]}")
        return {found[0]: list(spec)}
    out = {}
    for key, ids in spec.items():
        found = [p for p, _ in modules if module_matches(p, key) and not p.endswith(".base_layer")]
        if len(found) != 1:
            raise ValueError(f"trainable_token_indices key {key!r} must name one module, matches {found or 'none'}")
        out[found[0]] = list(ids)
    return out


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _tables(model: nn.Module) -> dict[str, Tensor]:
    """path -> weight of every embedding or linear layer (wrapped or not), to find tied weights by identity."""
    out = {}
    for path, m in outside_adapters(model):
        base = _base(m)
        if path and not path.endswith(".base_layer") and isinstance(base, nn.Embedding | nn.Linear):
            out[path] = base.weight
    return out


def _check_target(model: nn.Module, path: str, lora_paths: list[str], saved: list[str]) -> None:
    module = model.get_submodule(path)
    if path in lora_paths:
        raise ValueError(f"{path!r} is a LoRA target and has trainable tokens; a layer takes one or the other")
    if isinstance(module, LoraLayer) and not isinstance(module, TokenLayer):
        raise ValueError(f"{path!r} holds LoRA adapters {list(module.adapters)}; trainable tokens need a layer "
                         "without LoRA (the tied head of an embedding counts)")
    if isinstance(module, SavedModule) or any(path == s or path.startswith(s + ".") for s in saved):
        raise ValueError(f"{path!r} is trained in full (modules_to_save); give it either there or in "
                         "trainable_token_indices, not both")
    base = _base(module)
    if not any(isinstance(base, t) for t, _ in LAYERS) or not base.weight.is_floating_point():
        raise ValueError(f"trainable tokens need an nn.Embedding or an nn.Linear head with a float weight; "
                         f"{path!r} is a {type(base).__name__} ({base.weight.dtype})")


def _wrapper(model: nn.Module, path: str) -> tuple[TokenLayer, bool]:
    module = model.get_submodule(path)
    if isinstance(module, TokenLayer):
        return module, False
    layer_type = next(w for t, w in LAYERS if isinstance(module, t))
    return layer_type(module), True


def record_added_tokens(model: nn.Module, tokens: dict[str, int], adapter: str = "default") -> None:
    """Note on ``adapter``'s token rows which tokens were added to the tokenizer (token -> id): saved with the
    adapter, so a loader can add them to the base tokenizer and resize the embeddings (``lorakit.models``)."""
    held = [m.adapters[adapter] for _, m in outside_adapters(model)
            if isinstance(m, TokenLayer) and adapter in m.adapters and not m.adapters[adapter].tied]
    if not held:
        raise ValueError(f"adapter {adapter!r} has no trainable tokens")
    missing = sorted(set(tokens.values()) - {i for a in held for i in a.token_indices.tolist()})
    if missing:
        raise ValueError(f"added token ids {missing} are not trained by adapter {adapter!r}")
    for a in held:
        a.added_tokens = dict(tokens)


# ----- PEFT's TRAINABLE_TOKENS format (trainable tokens alone) ------------------------------------------------
PEFT_TT_KEYS = {"peft_type", "token_indices", "target_modules", "init_weights", "task_type", "inference_mode",
                "base_model_name_or_path", "auto_mapping", "peft_version", "revision", LORAKIT_KEY}


class PeftTrainableTokens:
    """Reads and writes PEFT's ``TRAINABLE_TOKENS`` adapters (core.tables ``PEFT_TYPES`` and ``PEFT_WRITERS`` entries)."""

    @staticmethod
    def to_lora(raw: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
        unknown = sorted(set(raw) - PEFT_TT_KEYS)
        if unknown:
            raise ValueError(f"TRAINABLE_TOKENS key {unknown[0]!r} is a key lorakit does not know")
        ids, target = raw.get("token_indices"), raw.get("target_modules")
        names = [target] if isinstance(target, str) else target
        if not isinstance(ids, list) or not (names is None or isinstance(names, list) and names):
            raise ValueError(f"TRAINABLE_TOKENS needs token_indices as a list and target_modules as module names, "
                             f"got {short_repr(ids)} and {short_repr(target)}")
        spec = ids if names is None else {n: ids for n in names}
        rows = {k[: -len(DELTA) - 1]: v for k, v in tensors.items() if k.endswith("." + DELTA)}
        kept = {p: v for p, v in rows.items() if names is None or any(module_matches(p[len(PREFIX):], n)
                                                                      for n in names)}
        if names is None:
            kept = dict(list(rows.items())[:1])
        for p, v in rows.items():  # PEFT also writes a tied head's copy of the rows: equal, or an error
            if p not in kept and not any(torch.equal(v, k) for k in kept.values()):
                raise ValueError(f"tensor {p}.{DELTA} belongs to no target of target_modules={short_repr(target)}")
        extra = sorted(k for k in tensors if not k.endswith("." + DELTA))
        if extra:
            raise ValueError(f"TRAINABLE_TOKENS file holds {extra[0]!r}, which is not a {DELTA} tensor")
        config = {"peft_type": "LORA", "target_modules": [], "trainable_token_indices": spec,
                  **{k: raw[k] for k in ("task_type", "base_model_name_or_path", LORAKIT_KEY) if k in raw}}
        return config, {f"{p}.{LORA_KEY}": v for p, v in kept.items()}

    @staticmethod
    def from_lora(peft: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]] | None:
        """Trainable tokens alone with one list of ids -> PEFT's ``TRAINABLE_TOKENS``; else None (LoRA layout)."""
        spec = peft.get("trainable_token_indices")
        if peft.get("target_modules") != [] or not spec:
            return None
        rows = {k[: -len(LORA_KEY) - 1]: v for k, v in tensors.items() if k.endswith("." + LORA_KEY)}
        lists = [spec] if isinstance(spec, list) else list(spec.values())
        if any(v != lists[0] for v in lists) or len(rows) != len(tensors):
            return None  # several lists of ids: PEFT's TRAINABLE_TOKENS has one; kept in the LoRA layout
        paths = [p[len(PREFIX):] for p in rows]
        config = {"peft_type": "TRAINABLE_TOKENS", "token_indices": lists[0], "init_weights": True,
                  "target_modules": paths[0] if len(paths) == 1 else paths, "inference_mode": True,
                  **{k: peft.get(k) for k in ("task_type", "base_model_name_or_path")}}
        return config, {f"{p}.{DELTA}": v for p, v in rows.items()}


def _check_added(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and k and type(i) is int and i >= 0 for k, i in v.items())


def _check_vocab(v: object) -> bool:
    return type(v) is int and v > 0


def register() -> None:
    """Put trainable tokens into core's tables (idempotent)."""
    if plan_tokens not in tables.EXTRA_LAYERS:
        tables.EXTRA_LAYERS.append(plan_tokens)
    tables.PEFT_TYPES["TRAINABLE_TOKENS"] = PeftTrainableTokens.to_lora
    if PeftTrainableTokens.from_lora not in tables.PEFT_WRITERS:
        tables.PEFT_WRITERS.append(PeftTrainableTokens.from_lora)
    tables.METADATA.update(vocab_size=_check_vocab, added_tokens=_check_added)
