"""`LoraConfig`: what to adapt and how, validated, serialisable to PEFT's `adapter_config.json`."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Bias = Literal["none", "all", "lora_only"]
Init = str  # a name in core.variants.INITIALIZERS: kaiming, gaussian, pissa, pissa_niter_<K>, olora

# Field names that differ between LoraConfig and PEFT's adapter_config.json.
_TO_PEFT = {
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "layers": "layers_to_transform",
    "init": "init_lora_weights",
}
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian"}
# PEFT options lorakit cannot honour: loading a config that sets one of them must fail loudly.
_PEFT_UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "trainable_token_indices": None,
}
LORAKIT_KEY = "lorakit"  # extra config key (ignored by PEFT): fingerprint, fused slices


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
            ``"pissa_niter_<K>"``, ``"olora"``, ``"loftq"``/``"loftq_<K>"`` (QLoRA, see
            :func:`lorakit.core.quantized.loftq_init`): A and B from the base weight, which is replaced by the
            residual (see :mod:`lorakit.core.variants`; ``save_adapter(..., convert_to_lora=True)`` writes
            the equivalent plain LoRA for the original base). PEFT's ``init_lora_weights`` values are
            accepted (``True`` is ``"kaiming"``).
        use_dora: DoRA (arXiv 2402.09353): a learned magnitude per output feature times the normalised
            direction of ``W0 + s·B·A`` (PEFT's ``use_dora``).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, arXiv 2312.03732).
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha``; keys use the list syntax
            of ``target_modules`` (or a full-match regex).
        slices: fused projections adapted on chosen equal output slices only, e.g.
            ``{"c_attn": [True, False, True]}`` adapts GPT-2's q and v but not k (loralib's
            ``enable_lora``). Each enabled slice gets its own rank-r pair.
        task_type / base_model_name_or_path: metadata written to ``adapter_config.json``.
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
    init: Init = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    slices: dict[str, list[bool]] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.r)
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.init is True:  # PEFT's init_lora_weights=True
            self.init = "kaiming"
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        _check(_is_pos(self.alpha), f"alpha must be a positive number, got {self.alpha!r}")
        _check(
            isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        _check(self.bias in ("none", "all", "lora_only"), f"bias must be none|all|lora_only, got {self.bias!r}")
        from .variants import parse_init  # variants builds on layers, which import this module

        parse_init(self.init)
        _check(isinstance(self.use_dora, bool), f"use_dora must be true or false, got {self.use_dora!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise ValueError(f"{name} regex {value!r} is invalid: {e}") from None
            elif value is not None:
                _check(
                    isinstance(value, list) and value and all(isinstance(s, str) and s for s in value),
                    f"{name} must be a non-empty list of module names, a regex string or 'all-linear', got {value!r}",
                )
        if self.layers is not None:
            _check(
                all(isinstance(i, int) and i >= 0 for i in self.layers),
                f"layers must be non-negative block indices, got {self.layers!r}",
            )
        for key, rank in self.rank_pattern.items():
            _check(isinstance(rank, int) and rank > 0, f"rank_pattern[{key!r}] must be a positive int, got {rank!r}")
        for key, a in self.alpha_pattern.items():
            _check(_is_pos(a), f"alpha_pattern[{key!r}] must be a positive number, got {a!r}")
        for key, mask in self.slices.items():
            _check(
                isinstance(mask, list) and len(mask) >= 2 and all(isinstance(b, bool) for b in mask) and any(mask),
                f"slices[{key!r}] must be a list of >= 2 booleans with at least one True, got {mask!r}",
            )

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
        """The fields of PEFT's ``adapter_config.json`` (``peft_type: "LORA"``)."""
        d: dict[str, Any] = {"peft_type": "LORA"}
        for f in dataclasses.fields(self):
            if f.name == "slices":
                continue
            d[_TO_PEFT.get(f.name, f.name)] = getattr(self, f.name)
        d["init_lora_weights"] = _PEFT_INIT.get(self.init, self.init)
        if self.init.startswith("loftq"):  # PEFT's spelling: "loftq" + loftq_config (lorakit's is NF4)
            d["init_lora_weights"] = "loftq"
            d["loftq_config"] = {"loftq_bits": 4, "loftq_iter": int(self.init.partition("_")[2] or 1)}
        d["fan_in_fan_out"] = False  # save_adapter sets it for Conv1D models; lorakit itself detects Conv1D by type
        d["inference_mode"] = True
        d.update(_PEFT_UNSUPPORTED)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Build from an ``adapter_config.json`` dict; unknown keys are ignored, unsupported features refused."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type is {d.get('peft_type')!r}, lorakit loads only 'LORA'")
        for key, neutral in _PEFT_UNSUPPORTED.items():
            if d.get(key, neutral) not in (neutral, None, False, {}, []):
                raise ValueError(f"adapter_config.json: {key}={d[key]!r} is not supported by lorakit")
        from_peft = {v: k for k, v in _TO_PEFT.items()}
        names = {f.name for f in dataclasses.fields(cls)} - {"slices"}
        kwargs = {}
        for key, value in d.items():
            name = from_peft.get(key, key)
            if name in names and value is not None:
                kwargs[name] = value
        init = kwargs.get("init", True)
        if init is True or init is False:
            init = "kaiming"  # A and B come from the file anyway
        if init == "loftq":
            loftq = d.get("loftq_config") or {}
            if loftq.get("loftq_bits", 4) != 4:
                raise ValueError(f"adapter_config.json: loftq_bits={loftq['loftq_bits']!r}: lorakit's LoftQ is 4-bit")
            iters = loftq.get("loftq_iter", 1)
            init = f"loftq_{iters}" if iters != 1 else "loftq"
        try:
            from .variants import parse_init

            parse_init(init)
        except ValueError:
            raise ValueError(f"adapter_config.json: init_lora_weights={init!r} is not supported by lorakit") from None
        kwargs["init"] = init  # a base-changing init (pissa...) is rerun on the base when loading, as PEFT does
        if isinstance(kwargs.get("target_modules"), list):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        if kwargs.get("modules_to_save"):
            kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
        if "r" in kwargs and "alpha" not in kwargs:
            kwargs["alpha"] = 8.0  # PEFT's default lora_alpha
        return cls(**kwargs)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with some fields changed (the original is never mutated)."""
        return dataclasses.replace(self, **changes)


def module_matches(name: str, key: str) -> bool:
    """``key`` names module ``name``: the same path, a suffix at a ``.`` boundary, or a full-match regex."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if module_matches(name, key):
            return value
    return default


def _is_pos(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0 and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
