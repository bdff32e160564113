"""Parameter counts of the paper's models, built from their configs on the meta device (no memory, no download),
beside the counts the paper publishes (Tables 2-4), with lorakit's LoRA trainable counts.

    python benchmarks/paper/params.py        # writes benchmarks/paper/results/params.json (seconds, any machine)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from baselines import write_json

import lorakit

RESULTS = Path(__file__).resolve().parent / "results" / "params.json"


def _gpt2(n_embd, n_layer, n_head, n_positions=1024):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions)


def _roberta(hidden, layers, heads):
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel, RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=4 * hidden, vocab_size=50265, max_position_embeddings=514,
                                       type_vocab_size=1)


def _deberta_xxl():
    from transformers import DebertaV2Config, DebertaV2Model

    return DebertaV2Model, DebertaV2Config(
        hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, intermediate_size=6144, vocab_size=128100,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0)


# name, builder, LoRA setting the paper reports, paper's model size (M), paper's LoRA trainable count (M), source
MODELS = [
    ("RoBERTa base", lambda: _roberta(768, 12, 12), {"r": 8, "target_modules": ["query", "value"]}, 125.0, 0.3,
     "Table 2"),
    ("RoBERTa large", lambda: _roberta(1024, 24, 16), {"r": 8, "target_modules": ["query", "value"]}, 355.0, 0.8,
     "Table 2"),
    ("DeBERTa XXL", _deberta_xxl, {"r": 16, "target_modules": ["query_proj", "value_proj"]}, 1500.0, 4.7, "Table 2"),
    ("GPT-2 M", lambda: _gpt2(1024, 24, 16), {"r": 4, "target_modules": ["c_attn"],
                                               "slices": {"c_attn": [True, False, True]}}, 354.92, 0.35, "Table 3"),
    ("GPT-2 L", lambda: _gpt2(1280, 36, 20), {"r": 4, "target_modules": ["c_attn"],
                                               "slices": {"c_attn": [True, False, True]}}, 774.03, 0.77, "Table 3"),
    ("GPT-3 175B", lambda: _gpt2(12288, 96, 96, 2048), {"r": 1, "target_modules": ["c_attn"],
                                                        "slices": {"c_attn": [True, False, True]}}, 175255.8, 4.7,
     "Table 4"),
    ("GPT-3 175B (r=8)", lambda: _gpt2(12288, 96, 96, 2048), {"r": 8, "target_modules": ["c_attn"],
                                                              "slices": {"c_attn": [True, False, True]}}, 175255.8,
     37.7, "Table 4"),
]


def count(builder, lora: dict) -> tuple[int, int]:
    cls, cfg = builder()
    with torch.device("meta"):
        model = cls(cfg)
    total = sum(p.numel() for p in model.parameters())
    lorakit.add_lora(model, lorakit.LoraConfig(alpha=2 * lora["r"], **lora))
    return total, lorakit.trainable_parameters(model)[0]


def main() -> int:
    rows = []
    for name, builder, lora, paper_total, paper_lora, source in MODELS:
        total, trainable = count(builder, lora)
        rows.append({"model": name, "params": total, "paper_params_m": paper_total, "lora": {**lora},
                     "lora_trainable": trainable, "paper_lora_m": paper_lora, "source": source})
        print(f"{name:<18} {total / 1e6:>12,.2f}M (paper {paper_total:,}M)   LoRA {trainable / 1e6:.3f}M "
              f"(paper {paper_lora}M)", flush=True)
    write_json(RESULTS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
