"""LoRA on nn.Conv1d/2d/3d (lorakit.layers.conv) against a plain-torch reference."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraConv
from tests.conftest import randomize_lora


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 3, padding=1), nn.Conv2d(3, 5, (3, 2), stride=2),
                                  nn.Conv3d(3, 5, (2, 3, 1), padding=(1, 0, 0))])
def test_conv_delta_weight_is_the_update(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    randomize_lora(model)
    layer = model[0]
    assert isinstance(layer, LoraConv)
    x = torch.randn(2, 3, *(9, 8, 7)[:conv.weight.dim() - 2])
    conv_fn = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[x.dim()]
    ref = conv_fn(x, conv.weight + layer.delta_weight("default"), conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_grouped_conv_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
