"""`lorakit analyze` on adapters as `save_adapter` writes them, for every layer type the core adapts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit.analyze import analyze_adapter, base_matrix, compare_adapters, read_updates, run_analysis
from lorakit.cli.main import main
from tests.conftest import CASES, build, randomize_lora

pytest.importorskip("transformers")

NAMES = ["mlp", "conv", "embedding", "gpt2", "gpt2-slices"]


@pytest.mark.parametrize("name", NAMES)
def test_delta_read_from_disk_is_what_merging_adds_to_the_base_weight(name, tmp_path):
    """ΔW from the checkpoint, in the base weight's layout (Conv1D / embedding transposed, conv flattened),
    equals merged weight - base weight: the orientation base_matrix() gives is the one merge uses."""
    case = next(c for c in CASES if c.name == name)
    model = build(case, seed=0)
    randomize_lora(model, seed=1, std=0.2)
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    base = case.build()
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    updates = read_updates(tmp_path)
    assert updates  # every adapted module of the case
    for module, up in updates.items():
        expected = base_matrix(merged.get_submodule(module)).double() - base_matrix(base.get_submodule(module)).double()
        # fp32 merge of O(1) weights: round-off ~1e-6; 1e-4 absolute is far below any orientation error (O(0.1))
        torch.testing.assert_close(up.delta(), expected, atol=1e-4, rtol=0)
    report = analyze_adapter(tmp_path, base)
    for row in report["layers"]:
        amp = row["amplification"]
        assert amp["delta_norm"] == pytest.approx(row["delta_norm"], rel=1e-9)
        assert amp["proj_delta"] > 0 and amp["proj_random"] > 0
        assert row["energy_rank"] <= row["rank"] and 0 < row["effective_rank"] <= row["rank"] + 1e-9


def test_two_seeds_and_a_copy(tmp_path):
    case = next(c for c in CASES if c.name == "gpt2-slices")
    for seed, d in ((1, "a"), (2, "b")):
        model = build(case, seed=0)
        randomize_lora(model, seed=seed)
        lorakit.save_adapter(model, tmp_path / d)
    same = compare_adapters(tmp_path / "a", tmp_path / "a")
    for row in same["layers"]:  # an adapter against itself: identical subspaces, on both sides of ΔW
        for key in ("phi", "phi_delta_out"):
            torch.testing.assert_close(torch.tensor(row[key], dtype=torch.float64),
                                       torch.ones(row["r1"], row["r2"], dtype=torch.float64), atol=1e-9, rtol=0)
    other = compare_adapters(tmp_path / "a", tmp_path / "b")
    assert [r["module"] for r in other["layers"]] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(row["phi_top"] < 1 - 1e-3 and row["phi_delta_out_top"] < 1 - 1e-3 for row in other["layers"])


def test_cli_writes_json_and_figures_and_prints_a_table(tmp_path, capsys):
    case = next(c for c in CASES if c.name == "bert")
    for r in (2, 6):
        torch.manual_seed(0)
        model = lorakit.add_lora(case.build(), lorakit.LoraConfig(r=r, alpha=8, **case.config))
        randomize_lora(model, seed=r)
        lorakit.save_adapter(model, tmp_path / f"r{r}")
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    case.build().save_pretrained(base_dir)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "r2"), str(tmp_path / "r6"), "--model", str(base_dir),
                 "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bert.encoder.layer.1.attention.self.value" in text and "φ(1,1)" in text and "amp(rand)" in text
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["adapters"]) == 2 and len(data["similarity"]["layers"]) == 4
    assert len(data["similarity"]["layers"][0]["phi"]) == 2 and len(data["similarity"]["layers"][0]["phi"][0]) == 6
    for f in ("spectrum_1.png", "spectrum_2.png", "amplification_1.png", "similarity.png", "similarity_zoom.png",
              "similarity_delta_out.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(tmp_path / "r2"), "--json"]) == 0  # no base: amplification left out
    data = json.loads(capsys.readouterr().out)
    assert data["base_model"] is None and "amplification" not in data["adapters"][0]["layers"][0]
    assert data["similarity"] is None


def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    case = next(c for c in CASES if c.name == "mlp")
    model = build(case, seed=0)
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path / "mlp")
    emb = build(next(c for c in CASES if c.name == "embedding"), seed=0)
    lorakit.save_adapter(emb, tmp_path / "emb")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "mlp"), str(tmp_path / "emb"), "--output-dir", str(out)]) == 2
    assert "no module in common" in capsys.readouterr().err
    assert not out.exists()
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "mlp" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.fc1.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="fc1 has non-finite"):
        run_analysis([tmp_path / "mlp"])
    with pytest.raises(ValueError, match="one or two"):
        run_analysis([tmp_path / "mlp"] * 3)


def test_modules_come_in_block_order(tmp_path):
    """``layer.2`` before ``layer.10`` (figures pick panels by this order), not string order."""
    model = lorakit.add_lora(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(12)]),
                             lorakit.LoraConfig(r=1, target_modules=r"\d+"))
    lorakit.save_adapter(model, tmp_path)
    assert list(read_updates(tmp_path)) == [str(i) for i in range(12)]


def test_dora_adapter_is_flagged(tmp_path):
    case = next(c for c in CASES if c.name == "mlp")
    model = build(case, seed=0, use_dora=True)
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path)
    report = analyze_adapter(tmp_path)
    assert report["use_dora"] is True and [r["module"] for r in report["layers"]] == ["fc1", "fc2"]
