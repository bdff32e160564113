"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: ``h = conv(x, W0) + scaling · B(A(dropout(x)))``.

``A`` is a convolution with the base's kernel, stride, padding and dilation to ``r`` channels, ``B`` a 1x1
convolution from ``r`` to the base's output channels, so the update is the conv with kernel
``B @ A * scaling``: ``(out, r) @ (r, in * prod(kernel))``, viewed as ``(out, in, *kernel)``.
"""

from __future__ import annotations

from torch import nn

from ..core.layers import Adapter, LoraLayer, factory_kwargs


class LoraConv(LoraLayer):
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: A is a conv with the base kernel, B a 1x1 conv."""

    stacks_rows = False  # a kernel is no (k, r) matrix: per-row batches run each row's adapter by loop

    def __init__(self, base_layer: nn.Module):
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer)

    def make_adapter(self, r, scaling, config, module_name):
        base, kw = self.base_layer, factory_kwargs(self.base_layer.weight)
        conv = type(base)
        A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                 bias=False, padding_mode=base.padding_mode, **kw)
        B = conv(r, base.out_channels, 1, bias=False, **kw)
        return Adapter(A, B, config.dropout, scaling, config)

    def to_base_layout(self, delta):
        return delta.view(self.base_layer.weight.shape)

    def as_matrix(self, weight):
        return weight.flatten(1)  # (out, in, *kernel) -> (out, in * prod(kernel))

    def feature_view(self, v):
        return v.view(-1, *[1] * (self.base_layer.weight.dim() - 2))  # channels: dim -(spatial dims + 1)
