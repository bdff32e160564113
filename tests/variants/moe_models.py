"""Tiny random-weight MoE causal LMs of transformers 5 (fused 3-D expert parameters), one per architecture."""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
# architecture -> config kwargs; every one stores its experts as gate_up_proj / down_proj parameters
ARCHS = {
    "mixtral": dict(head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=8, intermediate_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(head_dim=8, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(head_dim=8, intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
                  pad_token_id=0),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=32, moe_intermediate_size=16, n_routed_experts=4,
                        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                        kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1),
    # experts stored transposed ((E, in, out)) with biases, interleaved gate/up and a clamped SwiGLU
    "gpt_oss": dict(head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention"], sliding_window=4),
}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, **{**_COMMON, **ARCHS[arch]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # some archs initialise biases / routers to zero: make every expert distinct and used
        for name, p in model.named_parameters():
            if "experts" in name or ".gate." in name or name.endswith("router.weight"):
                p.normal_(0, 0.2)
    return model


def token_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
