"""LoraConfig: strict types (issue #8 item 16) and the PEFT key allow-list (item 5)."""

import dataclasses
import json

import pytest

import lorakit
from lorakit.core.config import PEFT_KEYS, LoraConfig


def test_every_field_of_the_installed_peft_lora_config_is_classified():
    peft = pytest.importorskip("peft")
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unclassified = sorted(fields - set(PEFT_KEYS))
    assert not unclassified, f"classify these PEFT LoraConfig fields in core/config.py PEFT_KEYS: {unclassified}"
    # every understood key maps onto a real LoraConfig field
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    assert {name for kind, name in PEFT_KEYS.values() if kind == "field"} <= ours
    assert {kind for kind, _ in PEFT_KEYS.values()} == {"field", "harmless", "refused"}


@pytest.mark.parametrize("key, value", [
    ("alora_invocation_tokens", [1, 2]), ("arrow_config", {"top_k": 2}), ("use_bdlora", {"a": 1}),
    ("kasa_config", {"x": 1}), ("velora_config", {"x": 1}), ("monteclora_config", {"x": 1}),
    ("ensure_weight_tying", True), ("megatron_config", {"x": 1}), ("use_qalora", True),
    ("a_key_from_a_future_peft", 3),
])
def test_options_lorakit_cannot_honour_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        LoraConfig.from_peft_dict({"peft_type": "LORA", "r": 2, key: value})
    # switched off (PEFT's defaults), the same keys load
    assert LoraConfig.from_peft_dict({"peft_type": "LORA", "r": 2, key: None}).r == 2


def test_harmless_keys_are_read_and_dropped():
    d = {"peft_type": "LORA", "r": 2, "revision": "main", "peft_version": "0.21.2", "inference_mode": False,
         "fan_in_fan_out": True, "eva_config": {"rho": 2.0}, "runtime_config": {"ephemeral_gpu_offload": True}}
    assert LoraConfig.from_peft_dict(d) == LoraConfig(r=2, alpha=8.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
    ({"use_rslora": 1}, "use_rslora must be true or false"),
    ({"r": True}, "r must be a positive integer"),
    ({"r": 2.0}, "r must be a positive integer"),
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": True}, "alpha must be"),
    ({"alpha": float("nan")}, "alpha must be"),
    ({"alpha": float("inf")}, "alpha must be"),
    ({"dropout": True}, "dropout must be"),
    ({"dropout": "0.1"}, "dropout must be"),
    ({"layers": [True]}, "layers must be"),
    ({"layers": "1"}, "layers must be"),
    ({"layers_pattern": 3}, "layers_pattern must be"),
    ({"modules_to_save": "head"}, "modules_to_save must be"),
    ({"rank_pattern": [1]}, "rank_pattern must be a mapping"),
    ({"rank_pattern": {"fc1": True}}, r"rank_pattern\['fc1'\] must be a positive int"),
    ({"alpha_pattern": {"fc1": "2"}}, r"alpha_pattern\['fc1'\]"),
    ({"slices": [[True, False]]}, "slices must be a mapping"),
    ({"task_type": 5}, "task_type must be a string"),
    ({"task_type": "NOPE"}, "task_type must be one of CAUSAL_LM, SEQ_CLS, .* got 'NOPE'"),
    ({"init": True}, "init must be"),
])
def test_every_field_is_type_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["fc1"], **kwargs)


@pytest.mark.parametrize("key, value", [
    ("use_rslora", "false"), ("r", True), ("r", 1e12), ("rank_pattern", [1]), ("lora_alpha", "16"),
    ("lora_dropout", False), ("init_lora_weights", [True]), ("target_modules", {"query": 1}),
])
def test_types_are_checked_from_json_too(tmp_path, key, value):
    d = json.loads(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["fc1"], key: value}))
    with pytest.raises(ValueError, match=key.replace("lora_", "") if key != "init_lora_weights" else key):
        LoraConfig.from_peft_dict(d)


def test_strict_booleans_keep_rslora_off():
    """use_rslora="false" used to be truthy: rsLoRA silently on (scaling alpha/sqrt(r) instead of alpha/r)."""
    assert LoraConfig(r=4, alpha=8, use_rslora=False).scaling("x") == 2.0
    with pytest.raises(ValueError):
        lorakit.LoraConfig(r=4, alpha=8, use_rslora="false")


def test_peft_dict_round_trip_is_peft_schema_only():
    config = LoraConfig(r=4, alpha=8, target_modules=["fc1"], use_rslora=True, rank_pattern={"fc1": 2})
    d = config.to_peft_dict()
    peft = pytest.importorskip("peft")
    assert set(d) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert LoraConfig.from_peft_dict(json.loads(json.dumps(d))) == config


# ----- issue 17 item 1: a scaling that is not finite in float32 is refused on construction -------------------------
@pytest.mark.parametrize("kw, message", [
    ({"r": 4, "alpha": 1e308}, r"scaling: alpha=1e\+308 / r=4 = 2.5e\+307 is not finite in torch.float32"),
    ({"r": 8, "alpha": 1e39, "rank_pattern": {"fc2": 1}}, r"alpha=1e\+39 / rank_pattern\['fc2'\]=1"),  # /8: finite
    ({"r": 4, "alpha_pattern": {"fc2": 1e308}}, r"alpha_pattern\['fc2'\]=1e\+308 / r=4"),
    ({"r": 16, "alpha": 2e39, "use_rslora": True}, r"alpha=2e\+39 / sqrt\(r=16\) = 5e\+38"),  # /16 would be finite
    ({"r": 4, "alpha": 10**400}, "alpha must be a positive finite number"),  # an int too large for a float
], ids=["alpha", "rank_pattern", "alpha_pattern", "rslora", "huge-int"])
def test_a_scaling_not_finite_in_float32_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["fc1"], **kw)
    peft = {"peft_type": "LORA", "target_modules": ["fc1"], **{{"alpha": "lora_alpha"}.get(k, k): v for k, v in kw.items()}}
    with pytest.raises(ValueError, match=message):  # from an adapter_config.json
        LoraConfig.from_peft_dict(json.loads(json.dumps(peft)))


def test_the_largest_finite_scalings_are_accepted():
    assert LoraConfig(r=8, alpha=1e39).scaling("fc1") == 1.25e38
    assert LoraConfig(r=16, alpha=2e39).scaling("fc1") == 1.25e38  # without rsLoRA: / 16
