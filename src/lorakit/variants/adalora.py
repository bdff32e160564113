"""AdaLoRA (Zhang et al., 2023, arXiv 2303.10512): SVD-form adapters and a rank budget spent where it matters.

Each adapted layer learns its update in the form of a singular value decomposition,

    ΔW = P · Λ · Q · scaling        P: (d × r) "left singular vectors"  = lora_B.weight
                                   Λ: diag(λ_1..λ_r)                   = lora_E (r × 1), starts at 0
                                   Q: (r × k) "right singular vectors" = lora_A.weight

kept near-orthogonal by the penalty ``R(P, Q) = ||PᵀP − I||²_F + ||QQᵀ − I||²_F`` (eq. 4). Every
``delta_t`` steps :class:`AdaLoraAllocator` scores each triplet ``(P_{·i}, λ_i, Q_{i·})`` by the smoothed
sensitivity of its parameters (eq. 8-11) and zeroes the λ of the least important ones until the total
number of live triplets follows the cubic budget schedule (eq. 12) from ``r`` per layer down to the target.

A zero λ contributes exactly nothing, so an AdaLoRA adapter *is* a plain LoRA of rank ``#{λ_i ≠ 0}``:
``A = λ ⊙ Q`` (live rows), ``B = P`` (live columns). :meth:`SVDAdapter.plain_pair` gives that pair, and
with it merge, unmerge, per-row adapters, ``combine_adapters`` and ``save_adapter`` (a PEFT/vLLM-loadable
plain LoRA with per-layer ranks in ``rank_pattern``) work unchanged.

    lorakit.add_lora(model, lorakit.AdaLoraConfig(r=12, target_modules=["query", "value"]))
    alloc = lorakit.AdaLoraAllocator(model, target_rank=4, total_steps=1000)
    for step in range(1, 1001):
        loss = model(**batch).loss + alloc.regularization()
        loss.backward()
        optimizer.step()
        alloc.step(step)            # after the optimizer step, before zero_grad (it reads the gradients)
        optimizer.zero_grad()
    lorakit.save_adapter(model, "out")   # plain LoRA, rank_pattern = the allocated ranks
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import LoraConfig
from ..core.layers import Adapter, LoraLayer, LoraLinear
from ..core.model import active_adapter, holding
from ..core.tables import PEFT_TYPES, VARIANTS

# PEFT's AdaLoRA init: P and Q ~ N(0, 0.02²), Λ = 0 (the update starts at zero, as LoRA's does).
INIT_STD = 0.02


@dataclass
class AdaLoraConfig(LoraConfig):
    """A :class:`LoraConfig` whose adapters take AdaLoRA's SVD form (:class:`SVDAdapter`), initial rank ``r``
    (``rank_pattern`` per module). Linear layers and GPT-2 ``Conv1D`` only; ``init`` is not used (P, Q ~
    N(0, 0.02²), Λ = 0); no DoRA, no fused slices. Saved as the equivalent plain LoRA (``peft_type: LORA``).
    The rank schedule is :class:`AdaLoraAllocator`'s."""

    def validate(self) -> None:
        super().validate()
        _check(self.init in ("kaiming", "gaussian"), f"AdaLoRA starts from P, Q ~ N(0, 0.02²) and Λ = 0; init "
               f"{self.init!r} is not supported")
        _check(not self.use_dora, "AdaLoRA and DoRA do not combine (use_dora=True)")
        _check(not self.slices, "AdaLoRA does not support fused slices (slices=...)")
        _check(self.target_parameters is None, "AdaLoRA does not support target_parameters (parameter/expert adapters)")

    def to_peft_dict(self) -> dict[str, Any]:
        """As LoRA's, without the initial ``rank_pattern``/``alpha_pattern``: a save gives every layer its
        live rank (:meth:`SVDAdapter.export_pattern`)."""
        return {**super().to_peft_dict(), "rank_pattern": {}, "alpha_pattern": {}}


class SVDAdapter(Adapter):
    """One AdaLoRA adapter on one linear-like layer: ``lora_B(λ ⊙ lora_A(dropout(x))) * scaling``.

    A variant in :data:`lorakit.core.tables.VARIANTS`, chosen by an :class:`AdaLoraConfig`."""

    def __init__(self, lora_A: nn.Linear, lora_B: nn.Linear, dropout: float, scaling: float, config: LoraConfig):
        super().__init__(lora_A, lora_B, dropout, scaling, config)  # Q: (r, k), P: (d, r)
        w = lora_B.weight
        self.lora_E = nn.Parameter(torch.zeros(w.shape[1], 1, device=w.device, dtype=w.dtype))  # Λ: (r, 1)

    @classmethod
    def wanted(cls, config: LoraConfig) -> bool:
        return isinstance(config, AdaLoraConfig)

    @classmethod
    def wrap(cls, layer: LoraLayer, plain: Adapter) -> SVDAdapter:
        if type(plain) is not Adapter or not isinstance(layer, LoraLinear):
            raise ValueError(f"AdaLoRA is not supported on {type(layer.base_layer).__name__} (linear layers and "
                             "GPT-2 Conv1D only)")
        svd = cls(plain.lora_A, plain.lora_B, 0.0, plain.scaling, plain.config)
        svd.dropout = plain.dropout
        svd.reset_parameters()
        return svd

    def reset_parameters(self) -> None:
        if self.lora_E.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.lora_A.weight, std=INIT_STD)
            nn.init.normal_(self.lora_B.weight, std=INIT_STD)
            nn.init.zeros_(self.lora_E)

    def forward(self, x: Tensor) -> Tensor:
        a = self.lora_A(self.dropout(x)) * self.lora_E[:, 0]  # (..., r): Q·x scaled by the singular values
        return self.lora_B(a) * self.scaling

    @property
    def live_rank(self) -> int:
        """Number of triplets with λ ≠ 0: the rank of the update."""
        return int((self.lora_E != 0).sum())

    def plain_pair(self) -> tuple[Tensor, Tensor]:
        """The exactly equivalent plain LoRA pair: ``A = (λ ⊙ Q)[live]`` ``(r', k)``, ``B = P[:, live]``
        ``(d, r')``; same scaling. Differentiable in P, λ and Q. With no live triplet: rank 1 with ``A = 0``
        (PEFT has no rank 0, and the layer's trained bias, if any, is saved with it)."""
        live = _live(self.lora_E)
        return self.lora_A.weight[live] * self.lora_E[live], self.lora_B.weight[:, live]

    def export_tensors(self) -> dict[str, Tensor]:  # saved as the equivalent plain LoRA of the live rank
        A, B = self.plain_pair()
        return {"lora_A.weight": A, "lora_B.weight": B, **self.extra_tensors()}

    def export_pattern(self, alpha: float) -> tuple[int, float]:  # the live rank, the same scaling
        live = self.plain_pair()[0].shape[0]
        return live, self.scaling * (math.sqrt(live) if self.config.use_rslora else live)

    def load_pair(self, A: Tensor, B: Tensor) -> None:
        raise NotImplementedError("an AdaLoRA (SVD-form) adapter cannot be set from a plain (A, B) pair")

    def orthogonality(self) -> Tensor:
        """``||PᵀP − I||²_F + ||QQᵀ − I||²_F`` in fp32 (eq. 4), also inside a bf16 autocast region."""
        P, Q = self.lora_B.weight.float(), self.lora_A.weight.float()
        with torch.autocast(P.device.type, enabled=False):
            eye = torch.eye(P.shape[1], device=P.device)
            return (P.T @ P - eye).pow(2).sum() + (Q @ Q.T - eye).pow(2).sum()


def svd_adapters(model: nn.Module, adapter: str) -> dict[str, SVDAdapter]:
    """Module path -> the :class:`SVDAdapter` named ``adapter`` on it."""
    return {path: m.adapters[adapter] for path, m in holding(model, adapter) if isinstance(m.adapters[adapter], SVDAdapter)}


# ----- the budget schedule and the allocator ------------------------------------------------------------
def budget_schedule(step: int, init_budget: int, target_budget: int, total_steps: int, tinit: int,
                    tfinal: int) -> int:
    """Total number of live triplets after ``step`` (eq. 12): ``b0`` during the first ``tinit`` steps,
    ``bT + (b0 − bT)·(1 − (t − tinit)/(T − tinit − tfinal))³`` (rounded down) until ``T − tfinal``, then ``bT``."""
    if step < tinit:
        return init_budget
    if step >= total_steps - tfinal:
        return target_budget
    progress = (step - tinit) / (total_steps - tinit - tfinal)
    return target_budget + math.floor((init_budget - target_budget) * (1 - progress) ** 3)


class AdaLoraAllocator:
    """Adaptive rank allocation for one AdaLoRA adapter (default: the active one) of ``model``.

    Call :meth:`regularization` in the loss and :meth:`step` once per optimizer step, after
    ``optimizer.step()`` and before ``zero_grad`` (it reads the gradients). Steps count from 1.

    Args:
        target_rank: average rank per layer at the end; the budget is ``target_rank × #layers`` triplets
            (PEFT's ``target_r``), out of ``Σ r_layer`` at the start.
        total_steps: the number of optimizer steps of the run (``T``).
        tinit: steps with the full budget before pruning starts (``t_i``; warms up the importance scores).
        tfinal: last steps trained with the final, fixed ranks (``t_f``).
        delta_t: re-allocate every this many steps during the budget phase (``ΔT``).
        beta1 / beta2: EMA factors of the sensitivity and of its uncertainty (eq. 9, 10).
        orth_reg_weight: ``γ``: :meth:`regularization` returns ``γ × mean over layers of R(P, Q)``.
        adapter: the adapter's name (default: the active adapter).

    Importance of triplet ``i`` (eq. 11): ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with
    ``s(w) = Ī(w)·Ū(w)``, ``I(w) = |w · ∂L/∂w|``, ``Ī ← β1 Ī + (1−β1) I``, ``Ū ← β2 Ū + (1−β2)|I − Ī|``.
    At a re-allocation (every ``delta_t`` steps from ``tinit`` on) the top-``b(t)`` triplets over all layers
    keep their λ and the others get λ = 0; that mask is re-applied after every step until the next
    re-allocation (eq. 7 holds at every step; PEFT lets pruned λ regrow between re-allocations, the same
    when ``delta_t = 1``). At ``T − tfinal`` the ranks are decided for good. A pruned triplet can come
    back at a later re-allocation: its P and Q keep training and keep their importance.
    """

    def __init__(self, model: nn.Module, target_rank: int, total_steps: int, *, tinit: int = 0, tfinal: int = 0,
                 delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.1,
                 adapter: str | None = None):
        name = adapter if adapter is not None else active_adapter(model)
        for key, value in (("target_rank", target_rank), ("total_steps", total_steps), ("delta_t", delta_t)):
            _check(_is_int(value) and value >= 1, f"{key} must be a positive integer, got {value!r}")
        for key, value in (("tinit", tinit), ("tfinal", tfinal)):
            _check(_is_int(value) and value >= 0, f"{key} must be a non-negative integer, got {value!r}")
        _check(tinit + tfinal < total_steps, f"tinit + tfinal ({tinit} + {tfinal}) must be < total_steps "
               f"({total_steps}): no step would be left to allocate ranks")
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            _check(_is_num(value) and 0 <= value < 1, f"{key} must be in [0, 1), got {value!r}")
        _check(_is_num(orth_reg_weight) and orth_reg_weight >= 0,
               f"orth_reg_weight must be a finite number >= 0, got {orth_reg_weight!r}")
        self.adapters = svd_adapters(model, name) if name is not None else {}
        if not self.adapters:
            raise ValueError(f"adapter {name!r} has no AdaLoRA layers; add it with lorakit.add_lora(model, lorakit.AdaLoraConfig(...))")
        self.adapter, self.total_steps, self.tinit, self.tfinal, self.delta_t = name, total_steps, tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.init_budget = sum(a.rank for a in self.adapters.values())
        self.target_budget = target_rank * len(self.adapters)
        _check(self.target_budget <= self.init_budget,
               f"target_rank {target_rank} x {len(self.adapters)} layers = {self.target_budget} triplets exceeds the "
               f"initial {self.init_budget}; pick target_rank <= the initial rank")
        self.ipt: dict[str, dict[str, Tensor]] = {}  # path -> {"A"|"E"|"B": Ī}
        self.unc: dict[str, dict[str, Tensor]] = {}  # path -> {"A"|"E"|"B": Ū}
        self.mask: dict[str, Tensor] | None = None  # path -> kept triplets, from the last allocation
        self.final = False  # the ranks are fixed (final phase)
        self.last_step = 0

    # ----- what the loop calls --------------------------------------------------------------------------
    def regularization(self) -> Tensor:
        """``γ × mean over layers of ||PᵀP − I||²_F + ||QQᵀ − I||²_F``: add it to the loss."""
        terms = [a.orthogonality() for a in self.adapters.values()]
        return self.orth_reg_weight * torch.stack(terms).mean()

    def step(self, global_step: int | None = None) -> int:
        """Update the importance scores and the ranks after optimizer step ``global_step`` (default: the
        previous one + 1). Returns the budget in force: the number of triplets allowed a non-zero λ."""
        t = self.last_step + 1 if global_step is None else global_step
        _check(_is_int(t) and t >= 1, f"global_step must be a positive integer, got {global_step!r}")
        self.last_step = t
        if t < self.total_steps - self.tfinal:
            self.update_importance()
            if t >= self.tinit and t % self.delta_t == 0:
                budget = budget_schedule(t, self.init_budget, self.target_budget, self.total_steps, self.tinit,
                                         self.tfinal)
                self.mask = self.mask_to_budget(budget)
            else:
                self.apply_mask()
        elif not self.final:  # the first step of the final phase: the ranks are decided once
            self.update_importance()
            self.mask, self.final = self.mask_to_budget(self.target_budget), True
            self.ipt, self.unc = {}, {}
        else:
            self.apply_mask()
        return self.init_budget if self.mask is None else int(sum(m.sum() for m in self.mask.values()))

    def apply_mask(self) -> None:
        """Zero the λ of the triplets the last allocation pruned (the optimizer step may have moved them)."""
        with torch.no_grad():
            for path, m in (self.mask or {}).items():
                self.adapters[path].lora_E.masked_fill_(~m.view(-1, 1), 0.0)

    # ----- the parts --------------------------------------------------------------------------------------
    def update_importance(self) -> None:
        """One EMA step of sensitivity ``Ī`` and uncertainty ``Ū`` from the current weights and gradients."""
        with torch.no_grad():
            for path, a in self.adapters.items():
                for key, p in (("A", a.lora_A.weight), ("E", a.lora_E), ("B", a.lora_B.weight)):
                    if p.grad is None:
                        continue
                    sens = (p * p.grad).abs().float()
                    ipt = self.ipt.setdefault(path, {}).setdefault(key, torch.zeros_like(sens))
                    unc = self.unc.setdefault(path, {}).setdefault(key, torch.zeros_like(sens))
                    ipt.mul_(self.beta1).add_(sens, alpha=1 - self.beta1)
                    unc.mul_(self.beta2).add_((sens - ipt).abs(), alpha=1 - self.beta2)

    def scores(self) -> dict[str, Tensor]:
        """Path -> importance ``S_i`` of each of the layer's ``r`` triplets (eq. 11), fp32 ``(r,)``."""
        out = {}
        for path, a in self.adapters.items():
            s = {k: self.ipt[path][k] * self.unc[path][k] for k in self.ipt.get(path, {})}
            score = torch.zeros(a.rank, device=a.lora_E.device)
            if "E" in s:
                score += s["E"][:, 0]
            if "A" in s:
                score += s["A"].mean(dim=1)  # Q: (r, k), mean over the row
            if "B" in s:
                score += s["B"].mean(dim=0)  # P: (d, r), mean over the column
            out[path] = score
        return out

    def mask_to_budget(self, budget: int) -> dict[str, Tensor]:
        """Keep the ``budget`` most important triplets over all layers (λ of the others set to 0).
        Returns path -> boolean mask of the kept triplets."""
        scores = self.scores()
        paths = list(scores)
        flat = torch.cat([scores[p].cpu() for p in paths])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel()), sorted=False).indices] = True
        masks, start = {}, 0
        with torch.no_grad():
            for p in paths:
                a = self.adapters[p]
                masks[p] = keep[start:start + a.rank].to(a.lora_E.device)
                start += a.rank
                a.lora_E.masked_fill_(~masks[p].view(-1, 1), 0.0)
        return masks

    def rank_pattern(self) -> dict[str, int]:
        """Path -> live rank now (the ``rank_pattern`` a save writes)."""
        return {path: a.live_rank for path, a in self.adapters.items()}

    # ----- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The allocator's state (EMA tensors, step, final mask) for an exact resume."""
        tensors = {f"ipt/{p}/{k}": v for p, d in self.ipt.items() for k, v in d.items()}
        tensors |= {f"unc/{p}/{k}": v for p, d in self.unc.items() for k, v in d.items()}
        tensors |= {f"mask/{p}": m for p, m in (self.mask or {}).items()}
        return {"last_step": self.last_step, "final": self.final, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; every key and shape is checked before anything changes."""
        _check(isinstance(state.get("last_step"), int) and isinstance(state.get("final"), bool)
               and isinstance(state.get("tensors"), dict), "allocator state needs last_step, final and tensors")
        ipt: dict[str, dict[str, Tensor]] = {}
        unc: dict[str, dict[str, Tensor]] = {}
        masks: dict[str, Tensor] = {}
        for key, value in state["tensors"].items():
            kind, path, *rest = key.split("/") + [""]
            a = self.adapters.get(path)
            _check(a is not None, f"allocator state {key!r} names a layer adapter {self.adapter!r} lacks")
            if kind == "mask":
                _check(tuple(value.shape) == (a.rank,), f"allocator state {key!r}: shape {tuple(value.shape)}, "
                       f"expected ({a.rank},)")
                masks[path] = value.clone().bool().to(a.lora_E.device)
                continue
            params = {"A": a.lora_A.weight, "E": a.lora_E, "B": a.lora_B.weight}
            _check(kind in ("ipt", "unc") and rest[0] in params, f"allocator state: unknown key {key!r}")
            want = tuple(params[rest[0]].shape)
            _check(tuple(value.shape) == want, f"allocator state {key!r}: shape {tuple(value.shape)}, expected {want}")
            (ipt if kind == "ipt" else unc).setdefault(path, {})[rest[0]] = value.float().clone().to(a.lora_E.device)
        self.ipt, self.unc, self.mask = ipt, unc, masks or None
        self.last_step, self.final = state["last_step"], state["final"]


# ----- PEFT AdaLoRA checkpoints -----------------------------------------------------------------------------
# Keys of PEFT's AdaLoraConfig beyond LoraConfig's: the training schedule (nothing to do at load time) and
# rank_pattern, which is honoured (the saved tensors are already cut to it).
_ADALORA_TRAINING_KEYS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                          "total_step")
_PREFIX = "base_model.model."


def peft_adalora_to_lora(raw: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT AdaLoRA checkpoint (``peft_type: "ADALORA"``) as the exactly equivalent plain LoRA one.

    PEFT computes ``lora_B @ (lora_A * lora_E) * lora_alpha / (init_r + 1e-5)``; the plain pair is
    ``A = (lora_A * lora_E)[live]``, ``B = lora_B[:, live]`` with ``alpha_pattern`` giving the same scaling
    (:meth:`SVDAdapter.plain_pair`'s form). Raises ValueError naming what does not fit.
    """
    init_r = raw.get("init_r", 12)
    alpha = raw.get("lora_alpha", 8)
    _check(_is_int(init_r) and init_r > 0, f"init_r must be a positive integer, got {init_r!r}")
    _check(_is_num(alpha) and alpha >= 0, f"lora_alpha must be a number >= 0, got {alpha!r}")
    scaling = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)  # as PEFT's AdaLoraLayer
    stems = sorted(k.removesuffix(".lora_E") for k in tensors if k.endswith(".lora_E"))
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for stem in stems:
        parts = {n: tensors.get(f"{stem}.lora_{n}") for n in "ABE"}
        missing = [f"{stem}.lora_{n}" for n, t in parts.items() if t is None]
        if missing:
            raise ValueError(f"AdaLoRA checkpoint lacks {missing[0]}")
        A, B, E = parts["A"], parts["B"], parts["E"]
        r = E.shape[0]
        _check(E.dim() == 2 and E.shape[1] == 1 and A.dim() == 2 and A.shape[0] == r and B.dim() == 2
               and B.shape[1] == r, f"AdaLoRA tensors of {stem} have inconsistent shapes: lora_A {tuple(A.shape)}, "
               f"lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)}")
        _check(r > 0, f"AdaLoRA tensors of {stem} have rank 0")
        live = _live(E)
        out[f"{stem}.lora_A.weight"] = (A[live] * E[live]).contiguous()
        out[f"{stem}.lora_B.weight"] = B[:, live].contiguous()
        ranks[stem.removeprefix(_PREFIX)] = live.numel()
    adalora = {f"{s}.lora_{n}" for s in stems for n in "ABE"}
    out |= {k: v for k, v in tensors.items() if k not in adalora}  # biases, modules_to_save
    _check(bool(ranks), "AdaLoRA checkpoint has no lora_E tensor: nothing to load")
    config = {k: v for k, v in raw.items() if k not in _ADALORA_TRAINING_KEYS}
    for key in ("rank_pattern", "layers_to_transform", "layers_pattern", "exclude_modules", "use_rslora"):
        config.pop(key, None)  # the adapted layers are named explicitly below
    config.update(peft_type="LORA", target_modules=sorted(ranks), r=max(ranks.values()), lora_alpha=1.0,
                  rank_pattern=ranks, alpha_pattern={p: scaling * n for p, n in ranks.items()})
    return config, out


def _live(E: Tensor) -> Tensor:
    """Indices of the non-zero singular values ``E: (r, 1)``; ``[0]`` (a zero one) when there is none."""
    live = (E[:, 0] != 0).nonzero().squeeze(1)
    return live if live.numel() else torch.zeros(1, dtype=torch.long, device=E.device)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def register() -> None:
    r"""Join core's tables: an :class:`AdaLoraConfig` builds :class:`SVDAdapter`\ s; PEFT's AdaLoRA checkpoints
    load as the equivalent plain LoRA."""
    if SVDAdapter not in VARIANTS:
        VARIANTS.append(SVDAdapter)
    PEFT_TYPES["ADALORA"] = peft_adalora_to_lora
