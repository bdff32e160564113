"""LoRA on parameters: 2-D weights and the fused 3-D expert stacks of mixture-of-experts models.

transformers 5 stores the experts of Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss... as 3-D
parameters of one module, ``experts.gate_up_proj`` ``(E, 2I, H)`` and ``experts.down_proj``
``(E, H, I)`` (``(E, in, out)`` where the module says ``is_transposed``), not as ``nn.Linear`` layers.
``LoraConfig.target_parameters`` (PEFT's name) adapts them: expert ``e`` of parameter ``W`` gets its own
rank-``r`` pair and computes with ``W[e] + s·B[e]·A[e]`` (``s = alpha / r``, or ``alpha / sqrt(r)``).

Storage is PEFT 0.21's ``ParamWrapper`` layout, so checkpoints move both ways unchanged. With ``k`` inputs
and ``d`` outputs per expert::

    lora_A.weight: (E*r, k)   rows e*r .. e*r+r-1 are A[e]            -> A = view(E, r, k)
    lora_B.weight: (d, r*E)   column j*E + e is column j of B[e]      -> B = view(d, r, E).permute(2, 0, 1)

A 2-D parameter ``(d, k)`` is the case ``E = 1``. Several targeted parameters of one module are nested
``ParamWrapper`` layers in PEFT, innermost first in the module's parameter order: the last one's keys sit
under the module path, the one before under ``<path>.base_layer``, and so on (:meth:`ParamAdapter.peft_tensors`).

Forward: PEFT adds the whole ``ΔW`` (``E x d x k``) to the weights on every call. When the wrapped module
has transformers' experts interface (``num_experts``, ``has_gate``, ``is_transposed``... set by
``use_experts_implementation``), :func:`routed_forward` runs the experts itself and adds the update from the
factors on the tokens routed to each expert, ``x_e·A[e]^T·B[e]^T·s`` (``(n_e, r)`` then ``(n_e, d)``): no
``ΔW`` at all. Any other module runs through ``torch.func.functional_call`` with ``W + ΔW`` in place of ``W``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.config import LoraConfig
from ..core.layers import Adapter, LoraLayer, init_pair
from .derived import Derived
from .param_targets import PARAMETER_LAYERS


class ExpertLora(Adapter):
    """The pair of one adapter on one parameter: ``E`` experts (1 for a 2-D parameter), rank ``r`` each.

    ``transposed``: the parameter is stored ``(E, k, d)`` (the module computes ``x @ W[e]``).
    """

    def __init__(self, param: Tensor, r: int, scaling: float, config: LoraConfig, transposed: bool):
        E, d, k = _geometry(param, transposed)
        kw = {"device": param.device, "dtype": param.dtype if param.dtype.is_floating_point else torch.float32}
        super().__init__(nn.Linear(k, E * r, bias=False, **kw), nn.Linear(E * r, d, bias=False, **kw), 0.0,
                         scaling, config)
        self.num_experts, self.transposed, self.ndim = E, transposed, param.dim()
        self._grouped = Derived()  # grouped_factors, kept for inference while A and B are unchanged

    @property
    def rank(self) -> int:
        return self.lora_A.weight.shape[0] // self.num_experts

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A: (E, r, k)`` and ``B: (E, d, r)`` (views of the stored weights)."""
        E, r = self.num_experts, self.rank
        A = self.lora_A.weight.view(E, r, -1)
        B = self.lora_B.weight.view(-1, r, E).permute(2, 0, 1)
        return A, B

    def grouped_factors(self) -> tuple[Tensor, Tensor]:
        """``A^T: (E, k, r')`` and ``B^T: (E, r', d)`` in the layout ``torch.nn.functional.grouped_mm`` takes (16-byte
        strides: the rank zero-padded to ``r'``, which changes no value; B^T made contiguous). Inference forwards
        reuse them until A or B changes (:class:`~lorakit.variants.derived.Derived`)."""
        return self._grouped.get((self.lora_A.weight, self.lora_B.weight), self._grouped_layout)

    def _grouped_layout(self) -> tuple[Tensor, Tensor]:
        A, B = self.factors()  # (E, r, k), (E, d, r)
        pad = -self.rank % max(1, 16 // A.element_size())
        At = (F.pad(A, (0, 0, 0, pad)) if pad else A).transpose(1, 2)  # (E, k, r')
        Bt = (F.pad(B, (0, pad)) if pad else B).transpose(1, 2).contiguous()  # (E, r', d)
        return At, Bt

    def delta(self) -> Tensor:
        """``s·B[e]·A[e]`` for every expert, in the parameter's layout and dtype of the factors."""
        A, B = self.factors()
        delta = torch.bmm(B, A) * self.scaling  # (E, d, k)
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta if self.ndim == 3 else delta[0]

    def expert_norms(self) -> Tensor:
        """``||s·B[e]·A[e]||_F`` per expert, fp32: ``(E,)``."""
        A, B = (t.detach().float() for t in self.factors())
        return torch.linalg.matrix_norm(torch.bmm(B, A)) * self.scaling

    def reset(self, init: str) -> None:
        """PEFT's initialisation of the stacked pair: A Kaiming-uniform over ``(E*r, k)`` (``gaussian``:
        N(0, 1/r)), B zero, so a new adapter leaves every expert unchanged."""
        init_pair(self.lora_A.weight, self.lora_B.weight, self.rank, init)


class ParamAdapter(nn.Module):
    """One adapter on the targeted parameters of one module: an :class:`ExpertLora` per parameter name.

    Not a plain ``B·A·x`` update of the module's input: ``combine_adapters`` refuses it by name
    (``additive = False``). Per-row batches run it where its layer routes tokens itself (``row_batched``: the
    experts of a transformers MoE block, :meth:`ParamLayer.row_forward`); on any other module they refuse it.
    """

    additive = False

    def __init__(self, parts: dict[str, ExpertLora], config: LoraConfig, row_batched: bool = False):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.config = config
        self.row_batched = row_batched

    @property
    def rank(self) -> int:
        return max(part.rank for part in self.parts.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.parts.values())).dtype

    def export_tensors(self) -> dict[str, Tensor]:
        """Checkpoint key suffix (after the module path) -> tensor, in PEFT's nesting: the module's last
        targeted parameter at the path itself, each earlier one a ``base_layer.`` deeper."""
        names = list(self.parts)
        out = {}
        for i, name in enumerate(names):
            stem = "base_layer." * (len(names) - 1 - i)
            out[f"{stem}lora_A.weight"] = self.parts[name].lora_A.weight
            out[f"{stem}lora_B.weight"] = self.parts[name].lora_B.weight
        return out

    def extra_tensors(self) -> dict[str, Tensor]:
        return {}  # everything is in export_tensors

    def export_pattern(self, alpha: float) -> None:
        return None  # the parts are stored as they are: the config's ranks and alphas


class ParamLayer(LoraLayer):
    """Wraps a module and adapts some of its own parameters (``parameter_names``, in the module's order).

    Every adapter of the layer targets the same parameters (as in PEFT, whose checkpoint keys encode them by
    nesting depth). The base module is untouched until an explicit merge; unloading hands it back.
    """

    def __init__(self, base_layer: nn.Module, parameter_names: list[str]):
        super().__init__(base_layer)
        order = [n for n, _ in base_layer.named_parameters(recurse=False)]
        self.parameter_names = sorted(parameter_names, key=order.index)
        self.fresh_output = False
        for name in self.parameter_names:
            p = getattr(base_layer, name)
            if p.dim() not in (2, 3):
                raise ValueError(f"target_parameters: {name} has shape {tuple(p.shape)}; only 2-D and 3-D "
                                 "parameters can be adapted")

    def forward(self, *args, **kwargs):
        base = self.base_layer
        if self.disabled:
            return base(*args, **kwargs)
        if self.row_plan is not None:  # per-row batch: lorakit.ops puts the rows' adapter names here
            return self.row_forward(self.row_plan.names, args, kwargs)
        if self.active is None or self.active in self.merged:
            return base(*args, **kwargs)
        adapter = self.adapters[self.active]
        routed = _routing_args(base, self.parameter_names, args, kwargs)
        if routed is not None:
            return routed_forward(base, *routed, dict(adapter.parts))
        weights = {name: getattr(base, name) + part.delta().to(getattr(base, name).dtype)
                   for name, part in adapter.parts.items()}
        return torch.func.functional_call(base, weights, args, kwargs)

    #: per-row batches hand this layer the rows' adapter names (``row_plan.names``): it groups the tokens itself
    routes_rows = True

    def row_forward(self, names: list[str | None], args: tuple, kwargs: dict) -> Tensor:
        """Row ``i`` of the batch runs adapter ``names[i]`` (None, or one this layer lacks: the base experts).

        transformers' MoE blocks flatten ``(b, s, H)`` to ``T = b*s`` tokens in row order, so token ``t`` is in
        row ``t // s``; each adapter's update runs on the (token, expert) pairs of its rows
        (:func:`routed_forward`, grouped by adapter then expert: no ``ΔW``)."""
        used = [n for n in dict.fromkeys(names) if n is not None and n in self.adapters]
        if not used:
            return self.base_layer(*args, **kwargs)
        routed = _routing_args(self.base_layer, self.parameter_names, args, kwargs)
        if routed is None:
            raise ValueError(f"per_row_adapters: {type(self.base_layer).__name__} was not called as transformers' "
                             "experts (hidden_states, top_k_index, top_k_weights); run its adapters with use_adapter()")
        hidden = routed[0]
        if hidden.shape[0] % len(names):
            raise ValueError(f"per_row_adapters got {len(names)} adapter names for {hidden.shape[0]} tokens at an "
                             "experts layer (not a whole number of tokens per row)")
        row = torch.arange(hidden.shape[0], device=hidden.device) // (hidden.shape[0] // len(names))  # (T,)
        slot = torch.tensor([used.index(n) if n in used else -1 for n in names], device=hidden.device)[row]  # (T,)
        tokens = [(slot == j, dict(self.adapters[n].parts)) for j, n in enumerate(used)]
        return routed_forward(self.base_layer, *routed, {}, tokens)

    @property
    def weight(self) -> Tensor:
        return getattr(self.base_layer, self.parameter_names[0])

    @property
    def bias(self) -> None:
        return None

    def base_weight(self) -> Tensor:
        return self.weight.detach()

    # ----- checkpoint layout (PEFT's ParamWrapper keys after the module path) ----------------------------------
    def file_tensors(self, adapter: ParamAdapter) -> dict[str, Tensor]:
        return adapter.export_tensors()

    def file_slots(self, adapter: ParamAdapter) -> dict[str, tuple[Tensor, bool]]:
        return {k: (t.data, False) for k, t in adapter.export_tensors().items()}

    # ----- building adapters ------------------------------------------------------------------------------
    def new_adapter(self, config: LoraConfig, module_name: str) -> ParamAdapter:
        """The pairs for every targeted parameter; rank and alpha patterns are keyed by the parameter's path
        (``<module>.<parameter>``, as in PEFT)."""
        transposed = bool(getattr(self.base_layer, "is_transposed", False))
        parts = {}
        for name in self.parameter_names:
            key = f"{module_name}.{name}"
            part = ExpertLora(getattr(self.base_layer, name), config.rank_for(key), config.scaling(key), config,
                              transposed)
            part.reset(config.init)
            parts[name] = part
        return ParamAdapter(parts, config, row_batched=_routes(self.base_layer, self.parameter_names))

    def make_adapter(self, r, scaling, config, module_name):
        raise ValueError("combine_adapters does not support parameter (expert) adapters")

    # ----- merge -----------------------------------------------------------------------------------------
    def merged_weights(self, name: str) -> dict[str, Tensor]:
        """Parameter name -> its weight with adapter ``name`` folded in (fp32 sum, cast to the weight's dtype)."""
        out = {}
        for pname, part in self.adapters[name].parts.items():
            w = getattr(self.base_layer, pname).detach()
            out[pname] = (w.float() + part.delta().detach().float().to(w.device)).to(w.dtype)
        return out

    def merged_weight(self, name: str) -> Tensor:
        """Every merged parameter, flattened and concatenated (what ``merge`` checks to be finite)."""
        return torch.cat([w.reshape(-1) for w in self.merged_weights(name).values()])

    def merge(self, name: str) -> None:
        with torch.no_grad():
            for pname, w in self.merged_weights(name).items():
                getattr(self.base_layer, pname).copy_(w)
        self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                for pname, part in self.adapters[self.merged.pop()].parts.items():
                    p = getattr(self.base_layer, pname)
                    p.copy_((p.float() - part.delta().float().to(p.device)).to(p.dtype))


# ----- the routed forward -------------------------------------------------------------------------------------
EXPERT_INTERFACE = ("num_experts", "has_gate", "has_bias", "is_transposed", "act_fn")


def _routes(module: nn.Module, names: list[str]) -> bool:
    """``module`` has transformers' experts interface and only its projections are targeted."""
    return all(hasattr(module, a) for a in EXPERT_INTERFACE) and not getattr(module, "_is_expert_parallel", False) \
        and set(names) <= {"gate_up_proj", "up_proj", "down_proj"}


def _routing_args(module: nn.Module, names: list[str], args: tuple, kwargs: dict):
    """``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))`` when ``module`` has transformers'
    experts interface, only its projections are targeted and it is called as transformers' MoE blocks call
    it; else None (the generic path)."""
    if not _routes(module, names):
        return None
    keys = ("hidden_states", "top_k_index", "top_k_weights")
    if len(args) + len(kwargs) != 3 or set(kwargs) - set(keys[len(args):]):
        return None
    values = list(args) + [kwargs[k] for k in keys[len(args):]]
    hidden, index, weights = values
    if hidden.dim() != 2 or index.dim() != 2 or weights.shape != index.shape:
        return None
    return hidden, index, weights


def routed_forward(experts: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   parts: dict[str, ExpertLora], tokens: list[tuple[Tensor, dict[str, ExpertLora]]] | None = None
                   ) -> Tensor:
    """transformers' experts computation (the semantics of its ``grouped_mm`` path) with LoRA on routed tokens.

    The ``S = T*k`` (token, expert) pairs are sorted by expert; expert ``e`` runs its ``n_e`` rows ``x_e``
    through ``W[e]`` plus ``s·(x_e @ A[e]^T) @ B[e]^T``: ``(n_e, r)`` then ``(n_e, d)``, so the extra memory
    and work are those of the rank-r products on the tokens the expert sees, never a ``(E, d, k)`` tensor.
    Shapes: hidden ``(T, H)``, top_k_index / top_k_weights ``(T, k)``; returns ``(T, H)``.

    ``parts`` applies to every token. ``tokens`` (per-row batches): ``(mask (T,) bool, parts)`` for each
    adapter, the tokens of its rows; the pairs of those tokens are a subsequence of the expert-sorted pairs, so
    they are grouped by (adapter, expert) and each adapter's update is the same two grouped matmuls on them.
    """
    T, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)  # (S,) pairs grouped by expert
    groups = _Groups(ids[order], experts.num_experts)
    updates = [(None, groups, parts)] if parts else []
    for mask, adapter_parts in tokens or []:  # the sorted pairs of this adapter's tokens, still grouped by expert
        sel = mask[order // k].nonzero().squeeze(1)  # (S_a,)
        if sel.numel():
            updates.append((sel, _Groups(groups.ids[sel], experts.num_experts), adapter_parts))
    x = hidden[order // k]  # (S, H)
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    h = _expert_linear(experts, up, x, groups, [(sel, g, p[up]) for sel, g, p in updates if up in p])  # (S, 2I)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    h = _expert_linear(experts, "down_proj", h, groups,
                       [(sel, g, p["down_proj"]) for sel, g, p in updates if "down_proj" in p])  # (S, H)
    if getattr(experts, "has_post_expert_norm", False):
        h = experts.post_expert_norm(h)
    h = h * top_k_weights.reshape(-1)[order, None].to(h.dtype)
    out = torch.empty_like(h).index_copy(0, order, h)  # back to (token, slot) order
    return out.view(T, k, h.shape[-1]).sum(dim=1).to(hidden.dtype)


class _Groups:
    """Rows sorted by expert: ``ids`` ``(S,)``, the grouped-matmul offsets and (lazily) the counts."""

    def __init__(self, ids: Tensor, num_experts: int):
        self.ids = ids
        self.counts = torch.bincount(ids, minlength=num_experts)  # (E,)
        self.offsets = self.counts.cumsum(0).to(torch.int32)

    def sizes(self) -> list[int]:
        return self.counts.tolist()  # a host sync: the loop path only


def _expert_linear(experts: nn.Module, name: str, x: Tensor, groups: _Groups,
                   updates: list[tuple[Tensor | None, _Groups, ExpertLora]]) -> Tensor:
    """Rows of ``x`` ``(S, k)`` (sorted by expert) through ``W[e]`` (+ bias, + the LoRA updates): ``(S, d)``.

    One grouped matmul for the base and two per update (``(S, r)``, then ``(S, d)``), each update on its rows
    ``sel`` of ``x`` (None: all) grouped by ``its groups``."""
    W = getattr(experts, name)
    Wt = W if experts.is_transposed else W.transpose(1, 2)  # (E, k, d)
    x = x.to(W.dtype)
    y = _grouped_matmul(x, Wt, groups)
    for sel, g, part in updates:
        update = _lora_update(x if sel is None else x[sel], g, part).to(y.dtype)
        y = torch.add(y, update, alpha=part.scaling) if sel is None else y.index_add(0, sel, update, alpha=part.scaling)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[groups.ids]
    return y


def _lora_update(x: Tensor, groups: _Groups, part: ExpertLora) -> Tensor:
    """``x_e @ A[e]^T @ B[e]^T`` per expert group (no scaling): ``(S, d)``."""
    At, Bt = part.grouped_factors()  # (E, k, r'), (E, r', d)
    return _grouped_matmul(_grouped_matmul(x.to(At.dtype), At, groups), Bt, groups)  # (S, r') -> (S, d)


def _grouped_matmul(x: Tensor, Wt: Tensor, groups: _Groups) -> Tensor:
    """``x[rows of e] @ Wt[e]`` for each expert's group of rows: ``(S, k) -> (S, d)``. One
    ``torch.nn.functional.grouped_mm`` where it takes the operands, else a loop over the experts."""
    if _grouped_ok(x, Wt):
        return F.grouped_mm(x, Wt, offs=groups.offsets)
    pieces, start = [], 0
    for e, n in enumerate(groups.sizes()):
        if n:
            pieces.append(x[start:start + n] @ Wt[e])  # (n, d)
            start += n
    return torch.cat(pieces) if pieces else x.new_zeros(0, Wt.shape[-1])


def _grouped_ok(*operands: Tensor | None) -> bool:
    """``F.grouped_mm`` exists and takes these operands: every stride but the unit one, and every start, a
    multiple of 16 bytes; one floating dtype."""
    if not hasattr(F, "grouped_mm"):
        return False
    ts = [t for t in operands if t is not None]
    dtype, device = ts[0].dtype, ts[0].device.type
    if any(t.dtype != dtype for t in ts) or not (device == "cpu" or device == "cuda" and dtype == torch.bfloat16):
        return False  # CUDA's kernel is bf16-only
    return all(t.data_ptr() % 16 == 0 and all(st == 1 or st * t.element_size() % 16 == 0 for st in t.stride())
               for t in ts)


def _geometry(param: Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(E, d, k)``: experts, outputs and inputs per expert (PEFT's reading of the shape)."""
    if param.dim() == 2:
        return 1, param.shape[0], param.shape[1]
    E, a, b = param.shape
    return (E, b, a) if transposed else (E, a, b)


def register() -> None:
    """Make ``LoraConfig.target_parameters`` available: core builds :class:`ParamLayer` through its table."""
    PARAMETER_LAYERS["default"] = ParamLayer
