"""`LoraConfig`: what to adapt and how, validated, serialisable to PEFT's `adapter_config.json`."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .tables import CONFIG_CHECKS, INITIALIZERS, parse_init

Bias = Literal["none", "all", "lora_only"]

# Every key of PEFT's ``adapter_config.json`` (the fields of ``peft.LoraConfig``), classified, one line each:
#   ("field", name)    understood: read into LoraConfig.<name> (and written back under the PEFT key)
#   ("harmless", None) known and irrelevant to what lorakit computes (metadata); read and dropped
#   ("refused", None)  an option lorakit cannot honour: loading fails unless the value is off (None/False/
#                      empty); never written
# A key not in this table is refused by name when set. tests/core/test_config.py fails when the installed
# peft's LoraConfig has a field this table does not classify.
PEFT_KEYS: dict[str, tuple[str, str | None]] = {
    "r": ("field", "r"),
    "lora_alpha": ("field", "alpha"),
    "lora_dropout": ("field", "dropout"),
    "target_modules": ("field", "target_modules"),
    "exclude_modules": ("field", "exclude_modules"),
    "target_parameters": ("field", "target_parameters"),
    "layers_to_transform": ("field", "layers"),
    "layers_pattern": ("field", "layers_pattern"),
    "bias": ("field", "bias"),
    "modules_to_save": ("field", "modules_to_save"),
    "init_lora_weights": ("field", "init"),
    "use_rslora": ("field", "use_rslora"),
    "use_dora": ("field", "use_dora"),
    "rank_pattern": ("field", "rank_pattern"),
    "alpha_pattern": ("field", "alpha_pattern"),
    "trainable_token_indices": ("field", "trainable_token_indices"),
    "task_type": ("field", "task_type"),
    "base_model_name_or_path": ("field", "base_model_name_or_path"),
    "peft_type": ("harmless", None),  # checked to be "LORA" before anything else
    "fan_in_fan_out": ("harmless", None),  # lorakit detects Conv1D (weight stored (in, out)) by type
    "inference_mode": ("harmless", None),
    "auto_mapping": ("harmless", None),
    "peft_version": ("harmless", None),
    "revision": ("harmless", None),
    "runtime_config": ("harmless", None),  # runtime-only switches (ephemeral GPU offload), no effect on results
    "megatron_core": ("harmless", None),  # module name used only together with megatron_config
    "qalora_group_size": ("harmless", None),  # used only together with use_qalora
    "loftq_config": ("harmless", None),  # initialisation recipe: the trained weights come from the file
    "eva_config": ("harmless", None),  # initialisation recipe
    "corda_config": ("harmless", None),  # initialisation recipe
    "lora_ga_config": ("harmless", None),  # initialisation recipe
    "lorakit": ("harmless", None),  # lorakit's metadata in checkpoints before it moved to the weights header
    "lora_bias": ("refused", None),
    "layer_replication": ("refused", None),
    "use_qalora": ("refused", None),
    "alora_invocation_tokens": ("refused", None),
    "megatron_config": ("refused", None),
    "velora_config": ("refused", None),
    "monteclora_config": ("refused", None),
    "use_bdlora": ("refused", None),
    "arrow_config": ("refused", None),
    "kasa_config": ("refused", None),
    "ensure_weight_tying": ("refused", None),
}
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # PEFT's
LORAKIT_KEY = "lorakit"  # lorakit's metadata (fingerprint, fused slices, class names): the weights file's header


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    Args:
        r: rank of the update B·A.
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (default ``alpha = r``).
        dropout: dropout probability applied to the LoRA input only.
        target_modules: which modules to adapt. A list matches a module path exactly or as a suffix at a
            ``.`` boundary (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is a regex
            that must match the full path; ``"all-linear"`` takes every linear-like layer except the
            output head. ``None`` uses the default for known transformers architectures.
        exclude_modules: same syntax as ``target_modules``; matching modules are never adapted.
        layers: only adapt modules inside these block indices (the first integer in the module path,
            or the integer after ``layers_pattern``).
        layers_pattern: name of the block list (``"layers"``, ``"h"``) when ``layers`` is set.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of adapted layers).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init: ``"kaiming"`` (A Kaiming-uniform, PEFT's default) or ``"gaussian"`` (A ~ N(0, 1/r), the
            paper's): B starts at zero, so a new adapter leaves the outputs unchanged. ``"pissa"``,
            ``"pissa_niter_<K>"``, ``"olora"``, ``"loftq"``/``"loftq_<K>"``: A and B from the base weight, which
            is replaced by the residual (:mod:`lorakit.variants.inits`). PEFT's ``init_lora_weights: true`` is
            ``"kaiming"``.
        use_dora: DoRA (arXiv 2402.09353): a learned magnitude per output feature times the normalised
            direction of ``W0 + s·B·A`` (PEFT's ``use_dora``).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, arXiv 2312.03732).
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha``; keys use the list syntax
            of ``target_modules`` (or a full-match regex).
        slices: fused projections adapted on chosen equal output slices only, e.g.
            ``{"c_attn": [True, False, True]}`` adapts GPT-2's q and v but not k (loralib's
            ``enable_lora``). Each enabled slice gets its own rank-r pair.
        trainable_token_indices: embedding rows trained as they are (PEFT's ``trainable_token_indices``): a
            list of token ids of the input embedding, or ``{"embed_tokens": [...], ...}`` by module name. A
            tied output embedding follows the input one. Alone, with ``target_modules=[]``, or beside LoRA
            (see :mod:`lorakit.variants.tokens`).
        task_type / base_model_name_or_path: metadata written to ``adapter_config.json``.
        target_parameters: parameters to adapt directly (PEFT's ``target_parameters``), above all the fused
            expert stacks of MoE models: names by path or suffix (``"experts.gate_up_proj"``), or
            ``"all-experts"`` (every 3-D parameter); one rank-``r`` pair per expert. With
            ``target_modules=None`` no module is adapted. As in PEFT: no dropout, no DoRA
            (:mod:`lorakit.variants.param_targets`, :mod:`lorakit.variants.params`).

    Every field's type is checked on construction, from code or from a file: ``r=True``, ``use_rslora="false"``
    or ``use_rslora=1`` (booleans are strict; a bool is not a number) raise ``ValueError`` naming the field.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers: list[int] | None = None
    layers_pattern: str | None = None
    bias: Bias = "none"
    modules_to_save: list[str] | None = None
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    slices: dict[str, list[bool]] = field(default_factory=dict)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    target_parameters: list[str] | str | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.r)
        for name in ("target_modules", "target_parameters"):
            if isinstance(getattr(self, name), tuple | set):
                setattr(self, name, list(getattr(self, name)))
        if _is_int(self.layers):
            self.layers = [self.layers]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field. Every field's type is checked strictly: a bool is
        not a number (``r=True`` is refused) and only ``True``/``False`` are booleans (not ``"false"``, not 1)."""
        _check(_is_int(self.r) and self.r > 0, f"r must be a positive integer, got {short_repr(self.r)}")
        _check(_is_pos(self.alpha), f"alpha must be a positive finite number, got {short_repr(self.alpha)}")
        _check(_is_num(self.dropout) and 0.0 <= self.dropout < 1.0,
               f"dropout must be a number in [0, 1), got {short_repr(self.dropout)}")
        _check(self.bias in ("none", "all", "lora_only"), f"bias must be none|all|lora_only, got {short_repr(self.bias)}")
        parse_init(self.init)  # a name in core.tables.INITIALIZERS, or <name>_<K> for a counted one
        _check(type(self.use_rslora) is bool, f"use_rslora must be true or false, got {short_repr(self.use_rslora)}")
        _check(type(self.use_dora) is bool, f"use_dora must be true or false, got {short_repr(self.use_dora)}")
        _check_token_indices(self.trainable_token_indices)
        self._validate_selection()
        for name in ("task_type", "base_model_name_or_path"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), f"{name} must be a string, got {short_repr(value)}")
        _check(self.task_type in (None, *TASK_TYPES),
               f"task_type must be one of {', '.join(TASK_TYPES)} (PEFT's), got {short_repr(self.task_type)}")
        for name in ("rank_pattern", "alpha_pattern", "slices"):
            value = getattr(self, name)
            _check(isinstance(value, dict) and all(isinstance(k, str) and k for k in value),
                   f"{name} must be a mapping of module names to values, got {short_repr(value)}")
        for key, rank in self.rank_pattern.items():
            _check(_is_int(rank) and rank > 0, f"rank_pattern[{short_repr(key)}] must be a positive int, got {short_repr(rank)}")
        for key, a in self.alpha_pattern.items():
            _check(_is_pos(a), f"alpha_pattern[{short_repr(key)}] must be a positive finite number, got {short_repr(a)}")
        check_scaling(self)  # float32 here; add_lora / load_adapter check again in each layer's dtype
        for check in CONFIG_CHECKS:  # fields a variant owns (target_parameters, slices)
            check(self)

    def _validate_selection(self) -> None:
        """The fields that select modules: ``target_modules``, ``exclude_modules``, ``layers``, ``layers_pattern``,
        ``modules_to_save``."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if name == "target_modules" and value == [] and self.trainable_token_indices:
                continue  # trainable tokens alone
            if isinstance(value, str):
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise ValueError(f"{name} regex {short_repr(value)} is invalid: {e}") from None
            elif value is not None:
                _check(_names(value), f"{name} must be a non-empty list of module names, a regex string or "
                                      f"'all-linear', got {short_repr(value)}")
        _check(self.layers is None or (isinstance(self.layers, list) and all(_is_int(i) and i >= 0 for i in self.layers)),
               f"layers must be a list of non-negative block indices, got {short_repr(self.layers)}")
        pattern = self.layers_pattern
        _check(pattern is None or (isinstance(pattern, str) and pattern) or _names(pattern),
               f"layers_pattern must be a module name or a list of them, got {short_repr(pattern)}")
        _check(self.modules_to_save in (None, []) or _names(self.modules_to_save),
               f"modules_to_save must be a list of module names, got {short_repr(self.modules_to_save)}")

    # ----- per-module values ---------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def slices_for(self, module_name: str) -> list[bool] | None:
        return _pattern_value(self.slices, module_name, None)

    def scaling(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ----- PEFT serialisation --------------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The fields of PEFT's ``adapter_config.json`` (``peft_type: "LORA"``): PEFT's schema only."""
        d: dict[str, Any] = {"peft_type": "LORA", "fan_in_fan_out": False, "inference_mode": True}
        for key, (kind, name) in PEFT_KEYS.items():
            if kind == "field":
                d[key] = copy.deepcopy(getattr(self, name))
        if self.target_modules is None and self.target_parameters is not None:
            d["target_modules"] = []  # PEFT: no modules (None would add its default modules for the architecture)
        name, arg = parse_init(self.init)
        to_peft = INITIALIZERS[name].to_peft
        d.update(to_peft(arg) if to_peft is not None else {"init_lora_weights": self.init})  # pissa...: PEFT's names
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Build from an ``adapter_config.json`` dict. Every key is looked up in :data:`PEFT_KEYS`: understood
        keys are read (and type-checked), harmless ones dropped, refused or unknown ones that are set raise."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, found {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type is {d.get('peft_type')!r}, lorakit loads only 'LORA'")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            kind, name = PEFT_KEYS.get(key, ("unknown", None))
            if kind == "field":
                if value is not None:
                    kwargs[name] = value
            elif kind != "harmless" and value not in (None, False, {}, [], ""):
                what = "is not supported by lorakit" if kind == "refused" else "is a key lorakit does not know"
                raise ValueError(f"{key}={short_repr(value)} {what}")
        init = kwargs.get("init", True)
        if not isinstance(init, bool | str):
            raise ValueError(f"init_lora_weights={short_repr(init)} is not supported by lorakit")
        init = "kaiming" if isinstance(init, bool) else init  # False: PEFT's "no init", the weights come from the file
        entry = INITIALIZERS.get(init)
        if entry is not None and entry.from_peft is not None:  # PEFT's recipe in other keys (loftq_config)
            init = entry.from_peft(d)
        try:
            parse_init(init)
        except ValueError:
            raise ValueError(f"init_lora_weights={short_repr(init)} is not supported by lorakit") from None
        kwargs["init"] = init  # a base-replacing init (pissa...) is rerun on the base when loading, as PEFT does
        if kwargs.get("target_modules") == [] and kwargs.get("target_parameters"):
            del kwargs["target_modules"]  # PEFT's "parameters only"
        for name in ("target_modules", "target_parameters"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = sorted(kwargs[name], key=str)
        if isinstance(kwargs.get("modules_to_save"), list):
            kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
        if "r" in kwargs and "alpha" not in kwargs:
            kwargs["alpha"] = 8.0  # PEFT's default lora_alpha
        return cls(**kwargs)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with some fields changed (the original is never mutated)."""
        return dataclasses.replace(self, **changes)


def check_scaling(config: LoraConfig, dtype: torch.dtype = torch.float32, module: str | None = None) -> None:
    """Raise a one-line ValueError unless the scaling ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) is finite in
    ``dtype``: a finite float64 value above ``torch.finfo(dtype).max`` (1e6 in fp16) overflows in every forward.

    ``module``: the scaling that module gets. ``None``: every combination of ``alpha`` / ``alpha_pattern`` value
    with ``r`` / ``rank_pattern`` value (the largest alpha over the smallest rank bounds them all).
    """
    where = f" of {module}" if module is not None else ""
    if module is not None:
        alphas, ranks = [("alpha", config.alpha_for(module))], [("r", config.rank_for(module))]
    else:
        alphas = [("alpha", config.alpha), *((f"alpha_pattern[{short_repr(k)}]", v) for k, v in config.alpha_pattern.items())]
        ranks = [("r", config.r), *((f"rank_pattern[{short_repr(k)}]", v) for k, v in config.rank_pattern.items())]
    (alpha_name, alpha), (r_name, r) = max(alphas, key=lambda x: x[1]), min(ranks, key=lambda x: x[1])
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    try:
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    except OverflowError:  # an integer too large for a float
        scaling = math.inf
    if not (math.isfinite(scaling) and abs(scaling) <= limit):
        formula = f"/ sqrt({r_name}={r})" if config.use_rslora else f"/ {r_name}={r}"
        raise ValueError(f"scaling{where}: {alpha_name}={alpha:g} {formula} = {scaling:g} is not finite in {dtype} "
                         f"(max {limit:g}); use a smaller alpha")


def module_matches(name: str, key: str) -> bool:
    """``key`` names module ``name``: the same path, a suffix at a ``.`` boundary, or a full-match regex."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _check_token_indices(spec: Any) -> None:
    """``trainable_token_indices``: None, a non-empty list of distinct token ids, or module name -> such a list."""
    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(_is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v)

    _check(spec is None or ids(spec) or (isinstance(spec, dict) and bool(spec) and all(
        isinstance(k, str) and k and ids(v) for k, v in spec.items())),
        "trainable_token_indices must be a non-empty list of distinct token ids (ints >= 0) or a mapping of "
        f"module names to such lists, got {short_repr(spec)}")


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if module_matches(name, key):
            return value
    return default


def _names(x: Any) -> bool:
    """A non-empty list of non-empty strings."""
    return isinstance(x, list) and bool(x) and all(isinstance(s, str) and s for s in x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float (a JSON integer of 400 digits)
        return False


def _is_pos(x: Any) -> bool:
    return _is_num(x) and x > 0


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short line (values read from files can be huge)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
