"""TrainConfig checks every field's type (from its annotation) and range before a run starts."""

import math

import pytest

from lorakit.train.config import TrainConfig


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", math.nan, "lr must be a finite number, got nan"),
    ("lr", math.inf, "lr must be a finite number"),
    ("lr", "fast", "lr must be a number, got str 'fast'"),
    ("lr", True, "lr must be a number, got bool"),
    ("batch_size", 1.5, "batch_size must be an integer, got float 1.5"),
    ("epochs", [1, 2], "epochs must be an integer, got list"),
    ("max_steps", True, "max_steps must be an integer or None, got bool True"),
    ("shuffle", "false", "shuffle must be true/false, got str 'false'"),
    ("bf16", 1, "bf16 must be true/false or None, got int 1"),
    ("scheduler", "sine", "scheduler must be one of 'cosine', 'linear', 'constant'"),
    ("output_dir", 123, "output_dir must be str, got int 123"),
    ("max_grad_norm", math.nan, "max_grad_norm must be a finite number"),
    ("lora_plus_ratio", -1.0, "lora_plus_ratio must be > 0"),
    ("device", "bogus", "device 'bogus' is not a torch device"),
    ("save_every", 0, "save_every must be None or >= 1"),
    ("seed", 2**64, "seed must be in [0, 2**63)"),
    ("seed", -1, "seed must be in [0, 2**63)"),
])
def test_bad_field_refused(field, value, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    assert message in str(e.value)


def test_good_values_accepted():
    cfg = TrainConfig(lr=1, max_steps=None, bf16=None, max_grad_norm=None, device="cpu", scheduler="cosine")
    assert cfg.lr == 1 and cfg.device == "cpu"
