"""Initialisers that read the base weight: PiSSA, OLoRA, LoftQ (entries of :data:`lorakit.core.tables.INITIALIZERS`).

An initialiser never writes the model: one that changes the base weight returns a
:class:`~lorakit.core.tables.BaseChange` holding the new base (in the base layout, any float dtype:
``layer.write_base`` casts, a quantized layer requantizes) and the pair ``(A0, B0)`` it took out, so that::

    original base  ==  new base + scaling · B0 · A0          (exact up to rounding for PiSSA/OLoRA)

Restore and conversion rely on this identity; an initialiser for which it holds only approximately
(LoftQ: the quantization error remains) returns ``A0 = B0 = None``: its base change is for good (nothing
to restore, no conversion, no exclusivity) and its docstring says so.

The layer writes the new base when the adapter is attached (``LoraLayer.attach``, at commit time),
keeps ``A0, B0`` on the adapter (non-persistent buffers), and restores the original base when the
adapter is deleted or unloaded without merging. From that record :func:`plain_lora_pair`
gives the exactly equivalent plain LoRA for the **original** base, ``A' = [A; A0]``, ``B' = [B, -B0]``
(rank 2r, same scaling), whatever initialiser changed the base (PEFT's
``path_initial_model_for_weight_conversion``). A base-changing adapter must be the only adapter on its model
(:func:`lorakit.core.model.check_base_kept`): the base model (``disabled``, per-row base rows) and other
adapters would run on the residual as if it were the base.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checkpoint import PREFIX
from ..core.config import short_repr
from ..core.layers import Adapter, LoraLayer, LoraLinear, changed_base
from ..core.model import holding
from ..core.tables import CONVERSIONS, INITIALIZERS, BaseChange, Init, parse_init
from .quantized import LOFTQ_PRESET, LoraQuantLinear, dequantize, quantized_linear, set_quantized_weight
from .slices import SlicedAdapter


def _pissa_init(layer: LoraLayer, adapter: Adapter, niter: int | None) -> BaseChange:
    """PiSSA (arXiv 2404.02948): A, B from the top-r singular triplets of W0, W0 replaced by the residual.

    ``W0 = U S V^T``; ``B = U_r sqrt(S_r) / sqrt(s)``, ``A = sqrt(S_r) V_r^T / sqrt(s)``, so ``s·B·A`` is the
    best rank-r part of W0, and the base becomes ``W0 - s·B·A``. ``niter``: randomized SVD
    (``torch.svd_lowrank`` with that many subspace iterations) instead of the full SVD.
    """
    W, r, s = _base_for_init(layer, adapter)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = S.sqrt() / math.sqrt(s)
    return _take_out(layer, adapter, W, A=root[:, None] * Vh, B=U * root[None, :])


def _olora_init(layer: LoraLayer, adapter: Adapter, arg: None) -> BaseChange:
    """OLoRA (arXiv 2406.01775), as PEFT: ``W0 = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``, base ``W0 - s·B·A``."""
    W, r, s = _base_for_init(layer, adapter)
    Q, R = torch.linalg.qr(W)
    return _take_out(layer, adapter, W, A=R[:r], B=Q[:, :r])


def _base_for_init(layer: LoraLayer, adapter: Adapter) -> tuple[Tensor, int, float]:
    if isinstance(adapter, SlicedAdapter) or not isinstance(layer, LoraLinear):
        where = "fused slices" if isinstance(adapter, SlicedAdapter) else type(layer.base_layer).__name__
        raise ValueError(f"init {adapter.config.init!r} works on linear layers (as PEFT's), not on {where}")
    W = layer.weight_matrix().float()  # (d, k)
    r = adapter.rank
    if r > min(W.shape):
        raise ValueError(f"init {adapter.config.init!r}: rank {r} exceeds min{tuple(W.shape)} of the base weight")
    return W, r, adapter.scaling


def _take_out(layer: LoraLayer, adapter: Adapter, W: Tensor, A: Tensor, B: Tensor) -> BaseChange:
    adapter.load_pair(A, B)
    A0, B0 = adapter.plain_pair()  # in the adapter's dtype: the residual is taken out of exactly what runs
    residual = W - adapter.scaling * (B0.float() @ A0.float())
    return BaseChange(layer.to_base_layout(residual), A0.detach().clone(), B0.detach().clone())



def loftq_init(layer: LoraLayer, adapter, iters: int):
    """The ``"loftq"`` / ``"loftq_<K>"`` initialiser (:data:`lorakit.core.tables.INITIALIZERS`).

    LoftQ (Li et al., 2023, arXiv 2310.08659, Algorithm 1) on a full-precision linear layer: the base weight
    ``W`` becomes ``dequant(Q)`` for an NF4 (double-quantized) ``Q`` chosen together with A and B so that
    ``dequant(Q) + s·B·A`` is close to ``W``, alternating ``iters`` times::

        Q_t      = quantize(W - s·B_{t-1}·A_{t-1})                (B_0 A_0 = 0: plain quantization)
        B_t, A_t = best rank-r fit of (W - dequant(Q_t)) / s       (truncated SVD, sqrt(S) split evenly)

    ``lorakit.quantize(model)`` then stores that base in 4 bits (requantizing ``dequant(Q)`` gives ``Q`` back:
    bit for bit without double quantization, to ~1e-5 with it). Quantization drops information, so the base
    change is for good: deleting the adapter does not bring ``W`` back, and no plain LoRA for the original
    base is equivalent (``convert_to_lora`` refuses it). Returns the staged base change.
    """
    if isinstance(layer, LoraQuantLinear):
        raise ValueError("init 'loftq' fits the adapter to the full-precision weight, and this base is already "
                         "quantized: add (or load) the adapter before lorakit.quantize(model)")
    W, r, s = _base_for_init(layer, adapter)
    scratch = quantized_linear(nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta"), 4, LOFTQ_PRESET, True,
                               None, weight=W)
    A, B = loftq_pair(W, scratch, r, s, iters)
    adapter.load_pair(A, B)
    base = layer.base_layer.weight
    return BaseChange(layer.to_base_layout(dequantize(scratch)).to(base.dtype), None, None)


def loftq_pair(weight: Tensor, layer: nn.Module, r: int, scaling: float, iters: int) -> tuple[Tensor, Tensor]:
    """LoftQ's alternation (see :func:`loftq_init`) with bitsandbytes ``layer`` as the quantizer: leaves ``Q_T``
    in ``layer`` and returns ``(A, B)`` in fp32, ``A: (r, in)``, ``B: (out, r)``."""
    w = weight.detach().float()
    low_rank = torch.zeros_like(w)
    for _ in range(iters):
        set_quantized_weight(layer, w - low_rank)
        U, S, Vh = torch.linalg.svd(w - dequantize(layer), full_matrices=False)
        root = S[:r].sqrt() / math.sqrt(scaling)
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        low_rank = scaling * (B @ A)
    return A, B


def _loftq_peft(iters: int | None) -> dict[str, Any]:
    """PEFT's spelling: ``"loftq"`` + ``loftq_config`` (lorakit's LoftQ is NF4)."""
    return {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": iters or 1}}


def _loftq_from_peft(raw: dict[str, Any]) -> str:
    loftq = raw.get("loftq_config") or {}
    bits, iters = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
    if type(bits) is not int or bits != 4:
        raise ValueError(f"loftq_bits={short_repr(bits)}: lorakit's LoftQ is 4-bit")
    return f"loftq_{iters}" if iters != 1 else "loftq"


def _loftq(layer: LoraLayer, adapter: Adapter, iters: int | None) -> BaseChange:
    return loftq_init(layer, adapter, iters or 1)


def plain_lora_pair(adapter: Adapter) -> tuple[Tensor, Tensor]:
    """The plain LoRA pair, for the **original** base, equivalent to ``adapter`` on its layer's base.

    Unchanged base: ``plain_pair()``. Changed base (``original = new + s·B0·A0``):
    ``new + s·B·A = original + s·(B·A - B0·A0) = original + s·[B, -B0]·[A; A0]`` (rank 2r, same scaling).
    """
    if not adapter.additive:
        raise ValueError(f"a {type(adapter).__name__} is not a plain LoRA update and cannot be converted")
    A, B = adapter.plain_pair()
    if not changed_base(adapter):
        return A, B
    return torch.cat([A, adapter.init_A.to(A.dtype)]), torch.cat([B, -adapter.init_B.to(B.dtype)], dim=1)


def to_plain_lora(model: nn.Module, adapter: str, tensors: dict[str, Tensor], peft: dict | None,
                  meta: dict | None) -> tuple[dict[str, Tensor], dict | None, dict | None]:
    """Core's ``CONVERSIONS`` entry (``convert_to_lora=True``): each layer whose base the adapter's initialiser
    replaced gets :func:`plain_lora_pair` under its ``lora_A``/``lora_B`` keys; the config gets every rank
    doubled with the scaling kept (``alpha * 2``, rsLoRA ``alpha * sqrt(2)``) and ``init_lora_weights: true``,
    the metadata no fingerprint (it was taken on the replaced base). Other adapters are returned as they are."""
    held = [(p, m.adapters[adapter]) for p, m in holding(model, adapter)]
    changed = [changed_base(a) for _, a in held]
    tensors = dict(tensors)
    for (path, a), replaced in zip(held, changed, strict=True):
        if replaced:  # A' = [A; A0] (r', k...), B' = [B, -B0] (d, r', ...) in the layer's own shapes
            A, B = plain_lora_pair(a)
            tensors[f"{PREFIX}{path}.lora_A.weight"] = A.reshape(-1, *a.lora_A.weight.shape[1:]).detach()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = B.reshape(B.shape[0], -1, *a.lora_B.weight.shape[2:]).detach()
    if peft is None or not held:
        return tensors, peft, meta
    init = held[0][1].config.init
    if not any(changed) and INITIALIZERS[parse_init(init)[0]].changes_base:  # changed for good (kept no A0, B0)
        raise ValueError(f"convert_to_lora: adapter {adapter!r} was initialised by {init!r}, whose base is not the "
                         "original minus a low-rank part (LoftQ's is the quantized weight): no plain LoRA for the "
                         "original base equals it")
    if not any(changed):
        return tensors, peft, meta
    if not all(changed):  # initialisers change every layer they run on, so this means a hand-built model
        raise ValueError(f"convert_to_lora: adapter {adapter!r} replaced the base of only some of its layers")
    f = math.sqrt(2) if peft.get("use_rslora") else 2  # alpha' / g(2r) == alpha / g(r)
    return (tensors, {**peft, "init_lora_weights": True, "r": 2 * peft["r"], "lora_alpha": f * peft["lora_alpha"],
                      "rank_pattern": {k: 2 * v for k, v in peft["rank_pattern"].items()},
                      "alpha_pattern": {k: f * v for k, v in peft["alpha_pattern"].items()}},
            {**meta, "base_fingerprint": None})


def register() -> None:
    """Add PiSSA (``pissa``, ``pissa_niter_<K>``), OLoRA and LoftQ (``loftq``, ``loftq_<K>``) to the table."""
    if to_plain_lora not in CONVERSIONS:
        CONVERSIONS.append(to_plain_lora)
    INITIALIZERS.update({
        "pissa": Init(_pissa_init),  # arg None: full SVD
        "pissa_niter": Init(_pissa_init, counted=True),
        "olora": Init(_olora_init),
        "loftq": Init(_loftq, counted=True, to_peft=_loftq_peft, from_peft=_loftq_from_peft),
    })
