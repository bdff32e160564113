"""Checkpoints: round trips, PEFT's format both ways, atomic writes, and every bad checkpoint refused."""

import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_adapter
from tests.conftest import CASES, MLP, build, randomize_lora


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, snapshot):
    sd, types = snapshot
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


def test_save_load_round_trip_under_another_seed(case, tmp_path):
    model = build(case, seed=0)
    randomize_lora(model, seed=1)
    if case.config.get("modules_to_save"):
        with torch.no_grad():
            model.classifier.copies["default"].weight.add_(0.5)
    inputs = case.inputs(3)
    expected = case.run(model, inputs)
    out_dir = lorakit.save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    torch.manual_seed(0)
    fresh = case.build()  # same base weights (seed 0), then adapter init under another seed
    torch.manual_seed(123)
    assert lorakit.load_adapter(fresh, out_dir) == "default"
    torch.testing.assert_close(case.run(fresh, inputs), expected, atol=1e-6, rtol=1e-6)


def test_checkpoint_keys_and_config_follow_peft(tmp_path):
    from tests.conftest import gpt2

    model = lorakit.add_lora(gpt2(), lorakit.LoraConfig(r=2, alpha=4, target_modules=["c_attn"],
                                                       slices={"c_attn": [True, False, True]}, bias="lora_only"))
    lorakit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert cfg["target_modules"] == ["c_attn"]
    assert cfg["rank_pattern"]["transformer.h.0.attn.c_attn"] == 4
    assert cfg["alpha_pattern"]["transformer.h.0.attn.c_attn"] == 8  # same scaling alpha/r as the slices
    assert "lorakit" not in cfg  # PEFT's schema only: lorakit's metadata is in the weights file's header
    assert len(read_adapter(tmp_path)[1]["lorakit"]["base_fingerprint"]) == 16


def test_non_default_adapter_goes_to_a_subfolder(tmp_path):
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]), "taskb")
    out = lorakit.save_adapter(model, tmp_path, adapter="taskb")
    assert out == tmp_path / "taskb" and (out / CONFIG_NAME).is_file()
    other = MLP()
    other.load_state_dict(lorakit.unload(model, merge=False).state_dict())
    assert lorakit.load_adapter(other, tmp_path, adapter="taskb") == "taskb"


def test_write_is_atomic_when_the_save_crashes(tmp_path, monkeypatch):
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    lorakit.save_adapter(model, tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()
    randomize_lora(model)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.core.checkpoint.save_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left


def test_saved_files_get_the_umask_permissions_not_private_temp_ones(tmp_path):
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    old = os.umask(0o022)
    try:
        lorakit.save_adapter(model, tmp_path)
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {
        CONFIG_NAME: 0o644, WEIGHTS_NAME: 0o644}  # a serving user in the group can read them (mkstemp: 0600)


def _saved_mlp(tmp_path):
    torch.manual_seed(0)
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    return MLP(), load_file(tmp_path / WEIGHTS_NAME)


KEY = "base_model.model.fc2.lora_B.weight"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.pop(KEY), r"fc2.lora_A.weight has no matching base_model.model.fc2.lora_B.weight"),
        (lambda t: [t.pop(KEY), t.pop("base_model.model.fc2.lora_A.weight")], "no lora_A tensor for target fc2"),
        (lambda t: t.update({"base_model.model.fc9.lora_A.weight": torch.zeros(2, 2),
                             "base_model.model.fc9.lora_B.weight": torch.zeros(2, 2)}), "unexpected 2"),
        (lambda t: t.update({KEY: torch.zeros(25, 2)}), r"fc2.lora_B.weight has shape \(25, 2\), expected \(24, 2\)"),
        (lambda t: t.update({KEY: torch.zeros(24, 2, dtype=torch.int64)}), "dtype torch.int64, expected a floating"),
        (lambda t: t[KEY].__setitem__((0, 0), float("nan")), "fc2.lora_B.weight has non-finite"),
    ],
    ids=["missing-B", "missing", "extra", "shape", "dtype", "nan"],
)
def test_bad_tensors_are_refused_and_model_untouched(tmp_path, corrupt, message):
    model, tensors = _saved_mlp(tmp_path)
    corrupt(tensors)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    snapshot = _state(model)
    with pytest.raises(CheckpointError, match=message):
        lorakit.load_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)


def test_broken_files_are_refused_and_model_untouched(tmp_path):
    model, _ = _saved_mlp(tmp_path)
    snapshot = _state(model)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lorakit.load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lorakit.load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_bias": True}))
    with pytest.raises(CheckpointError, match="lora_bias"):
        lorakit.load_adapter(model, tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        lorakit.load_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)


def test_a_folder_above_the_adapters_names_them(tmp_path):
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    lorakit.save_adapter(model, tmp_path / "run" / "adapter")
    lorakit.save_adapter(model, tmp_path / "run" / "best")
    with pytest.raises(FileNotFoundError, match=r"^no adapter_config.json in .*run \(adapters in its subfolders: "
                                                r"adapter/, best/\)$"):
        read_adapter(tmp_path / "run")  # a `lorakit train` output dir, or a folder of PEFT's named adapters
    (tmp_path / "run" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^no adapter_config.json in \S+$"):
        read_adapter(tmp_path / "run" / "empty")
    with pytest.raises(FileNotFoundError, match=r"^adapter directory \S+missing does not exist$"):
        read_adapter(tmp_path / "run" / "missing")
    with pytest.raises(FileNotFoundError, match=r"^adapter directory \S+config.json is a file$"):
        read_adapter(tmp_path / "run" / "adapter" / "adapter_config.json")


def test_target_mismatch_is_refused_and_model_untouched(tmp_path):
    model, _ = _saved_mlp(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["target_modules"] = ["q_proj"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    snapshot = _state(model)
    with pytest.raises(CheckpointError, match="no module matches target_modules"):
        lorakit.load_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)


def test_fingerprint_warns_on_a_different_base(tmp_path):
    _saved_mlp(tmp_path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(MLP(), tmp_path)  # same base: silent
    torch.manual_seed(99)
    with pytest.warns(UserWarning, match="different base weights"):
        lorakit.load_adapter(MLP(), tmp_path)


def test_lora_state_dict_holds_only_the_adapter():
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]), "a")
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, target_modules=["fc2"]), "b")
    sd = lorakit.lora_state_dict(model, "b")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "base_model.model.fc2.lora_A.weight": (3, 24),
        "base_model.model.fc2.lora_B.weight": (24, 3),
    }


@pytest.mark.parametrize(
    "name, overrides",
    [("gpt2", {}), ("gpt2-slices", {}), ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
     ("bert", {"bias": "lora_only"})],
    ids=["gpt2", "gpt2-slices", "llama-embedding", "bert-head-bias"],
)
def test_lorakit_adapter_loads_in_peft_with_same_outputs(name, overrides, tmp_path):
    peft = pytest.importorskip("peft")
    case = next(c for c in CASES if c.name == name)
    model = build(case, seed=0, **overrides)
    randomize_lora(model, seed=5, std=0.1)
    inputs = case.inputs(3)
    expected = case.run(model, inputs)
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    base = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT reads the config without a warning (no extra keys)
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(case.run(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_peft_adapter_loads_in_lorakit_with_same_outputs(name, tmp_path):
    peft = pytest.importorskip("peft")
    case = next(c for c in CASES if c.name == name)
    torch.manual_seed(0)
    targets = {"gpt2": ["c_attn", "wte"], "llama": ["q_proj", "v_proj", "embed_tokens"], "bert": ["query", "value"]}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[name], init_lora_weights=False,
                          modules_to_save=["classifier"] if name == "bert" else None, bias="lora_only")
    peft_model = peft.get_peft_model(case.build(), cfg).eval()
    inputs = case.inputs(3)
    expected = case.run(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = case.build()
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(case.run(model, inputs), expected, atol=1e-5, rtol=1e-5)


# ----- issue #8: PEFT's schema only (item 11), malformed values (item 14), finite in the model dtype (15) ---
def test_peft_loads_a_lorakit_checkpoint_without_any_warning(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    randomize_lora(model)
    expected = model(torch.ones(2, 12))
    lorakit.save_adapter(model, tmp_path)
    assert "lorakit" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    torch.manual_seed(0)
    base = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warned "Unexpected keyword arguments ['lorakit']" on every load
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(peft_model(torch.ones(2, 12)), expected, atol=1e-6, rtol=1e-6)


def test_old_checkpoints_with_metadata_in_the_config_still_load(tmp_path):
    _saved_mlp(tmp_path)
    meta = read_adapter(tmp_path)[1]["lorakit"]
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "lorakit": meta}))  # where lorakit used to put it
    save_file(load_file(tmp_path / WEIGHTS_NAME), tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    assert read_adapter(tmp_path)[1]["lorakit"] == meta
    torch.manual_seed(99)
    with pytest.warns(UserWarning, match="different base weights"):  # the old fingerprint is still read
        lorakit.load_adapter(MLP(), tmp_path)


def _edit_config(tmp_path, **changes):
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("edit, message", [
    (lambda p: _edit_config(p, r=True), "r must be a positive integer, got True"),
    (lambda p: _edit_config(p, r=1e12), "r must be a positive integer"),
    (lambda p: _edit_config(p, r=10**12), r"fc1.lora_A.weight has shape \(2, 12\), but adapter_config.json gives "
                                          "rank 1000000000000"),
    (lambda p: _edit_config(p, rank_pattern=[1]), "rank_pattern must be a mapping"),
    (lambda p: _edit_config(p, use_rslora="false"), "use_rslora must be true or false"),
    (lambda p: _edit_config(p, lorakit="x"), "'lorakit' must be an object, found str"),
    (lambda p: _edit_config(p, alora_invocation_tokens=[5]), "alora_invocation_tokens=.5. is not supported"),
    (lambda p: (p / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000), "JSON nested too deeply"),
    (lambda p: save_file(load_file(p / WEIGHTS_NAME), p / WEIGHTS_NAME, metadata={"lorakit": "{"}),
     "header metadata 'lorakit' is not valid JSON"),
    (lambda p: save_file(load_file(p / WEIGHTS_NAME), p / WEIGHTS_NAME, metadata={"lorakit": '{"id2label": 3}'}),
     "id2label has an invalid value 3"),
], ids=["r-bool", "r-float", "r-huge", "rank_pattern-list", "rslora-string", "lorakit-string", "alora", "deep",
        "header-json", "header-value"])
def test_malformed_checkpoints_raise_one_line_checkpoint_errors(tmp_path, edit, message):
    model, _ = _saved_mlp(tmp_path)
    edit(tmp_path)
    snapshot = _state(model)
    with pytest.raises(CheckpointError, match=message) as info:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    _assert_unchanged(model, snapshot)


def test_finiteness_is_checked_in_the_model_dtype(tmp_path):
    model, tensors = _saved_mlp(tmp_path)
    tensors[KEY] = torch.full_like(tensors[KEY], 1e6)  # finite in fp32, inf in fp16 (max 65504)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    lorakit.load_adapter(MLP(), tmp_path)  # fp32 model: fine
    model = model.half()
    snapshot = _state(model)
    with pytest.raises(CheckpointError, match=r"fc2.lora_B.weight has non-finite values \(nan/inf\) in torch.float16"):
        lorakit.load_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)


# ----- issue 17 item 1: a scaling that is not finite in the model's dtype is refused by load_adapter -----------------
@pytest.mark.parametrize("changes, dtype, message", [
    ({"lora_alpha": 1e308}, torch.float32, r"adapter_config.json: scaling: alpha=1e\+308 / r=2"),
    ({"alpha_pattern": {"fc2": 1e308}}, torch.float32, r"adapter_config.json: scaling: alpha_pattern\['fc2'\]=1e\+308"),
    ({"lora_alpha": 1e6}, torch.float16, r"scaling of fc1: alpha=1e\+06 / r=2 = 500000 is not finite in torch.float16"),
], ids=["fp32", "alpha_pattern", "fp16"])
def test_load_adapter_refuses_a_scaling_not_finite_in_the_model_dtype(tmp_path, changes, dtype, message):
    model, _ = _saved_mlp(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    model = model.to(dtype)
    snapshot = _state(model)
    with pytest.raises(CheckpointError, match=message) as e:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    _assert_unchanged(model, snapshot)
    if dtype == torch.float16:  # the same file loads into an fp32 model, whose forward is finite
        fp32 = MLP()
        lorakit.load_adapter(fp32, tmp_path)
        assert torch.isfinite(fp32(torch.randn(2, 12))).all()


# ----- issue 17 item 4: the same adapter always gives the same bytes ---------------------------------------------
_SAVE_FOUR_TIMES = """
import hashlib, sys, torch, lorakit
from tests.conftest import MLP, randomize_lora
torch.manual_seed(0)
model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                                                  alpha_pattern={"fc2": 4.0}, rank_pattern={"fc2": 3}))
randomize_lora(model)
for i in range(4):  # safetensors' header map has a new order per map, not only per process
    out = lorakit.save_adapter(model, f"{sys.argv[1]}/{i}")
    print(*(hashlib.sha256((out / name).read_bytes()).hexdigest() for name in sorted(p.name for p in out.iterdir())))
"""


def test_the_same_adapter_saved_in_two_processes_gives_the_same_bytes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lorakit.__file__).parents[1]), str(root)]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_FOUR_TIMES, str(tmp_path / seed)], cwd=root, text=True,
                              env={**env, "PYTHONHASHSEED": seed}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in ("1", "2")]  # side by side
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        lines += out.splitlines()
    assert len(lines) == 8 and len(set(lines)) == 1, lines  # 2 processes x 4 saves, config and weights alike
    with open(tmp_path / "1" / "0" / WEIGHTS_NAME, "rb") as f:  # the header: metadata first, keys sorted
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert list(header)[0] == "__metadata__" and list(header["__metadata__"]) == ["format", "lorakit"]
    assert load_file(tmp_path / "1" / "0" / WEIGHTS_NAME).keys() == load_file(tmp_path / "2" / "3" / WEIGHTS_NAME).keys()
