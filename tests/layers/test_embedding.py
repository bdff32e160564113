"""LoRA on nn.Embedding (lorakit.layers.embedding) against a plain-torch reference."""

import torch
from torch import nn

import lorakit
from lorakit.layers import LoraEmbedding
from tests.conftest import randomize_lora


def test_embedding_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 6))
    lorakit.add_lora(model, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"]))
    randomize_lora(model)
    layer = model[0]
    assert isinstance(layer, LoraEmbedding)
    a = layer.adapters["default"]
    ids = torch.randint(0, 30, (4, 5))
    ref = layer.base_layer.weight[ids] + 2.0 * a.lora_A.weight[ids] @ a.lora_B.weight.T
    torch.testing.assert_close(layer(ids), ref, atol=1e-5, rtol=1e-5)
