"""LoRA on ``nn.Embedding``: ``out[t] = W[x_t] + scaling · A[x_t] @ B^T``.

``lora_A`` is an embedding table ``(num, r)`` (applied to token ids; no dropout on ids), ``lora_B`` maps
``r -> dim``. As a matrix the update is ``B @ A^T * scaling``: ``(dim, num)``, transposed to the base
table's ``(num, dim)`` layout. PEFT stores ``lora_embedding_A`` ``(r, num)`` and ``lora_embedding_B``
``(dim, r)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layers import Adapter, LoraLayer, factory_kwargs


class LoraEmbedding(LoraLayer):
    """``nn.Embedding``: ``lora_A`` is an embedding table ``(num, r)``, ``lora_B`` maps ``r -> dim``."""

    takes_ids = True

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.fresh_output = type(base_layer) is nn.Embedding  # a lookup's output is a new tensor

    def make_adapter(self, r, scaling, config, module_name):
        base, kw = self.base_layer, factory_kwargs(self.base_layer.weight)
        A = nn.Embedding(base.num_embeddings, r, padding_idx=base.padding_idx, **kw)
        B = nn.Linear(r, base.embedding_dim, bias=False, **kw)
        return Adapter(A, B, 0.0, scaling, config)  # no dropout on token ids

    def file_tensors(self, adapter):  # PEFT's embedding keys: A stored (r, num), as plain_pair gives it
        A, B = adapter.plain_pair()  # the adapter's exported pair (a hot-swap adapter's live rank, not its padding)
        return {"lora_embedding_A": A, "lora_embedding_B": B, **adapter.extra_tensors()}

    def file_slots(self, adapter):
        slots = {"lora_embedding_A": (adapter.lora_A.weight.data, True),
                 "lora_embedding_B": (adapter.lora_B.weight.data, False),
                 # PEFT's save_embedding_layers also stores the (possibly resized) base table: optional
                 "base_layer.weight": (self.base_layer.weight.data, False)}
        return slots | {k: (t.data, False) for k, t in adapter.extra_tensors().items()}

    def init_adapter(self, adapter, init):
        """A ~ N(0, 1) (``gaussian``: N(0, 1/r)), B zero: PEFT's embedding init."""
        if not adapter.lora_A.weight.is_meta:
            with torch.no_grad():
                nn.init.normal_(adapter.lora_A.weight, std=1.0 / adapter.rank if init == "gaussian" else 1.0)
                nn.init.zeros_(adapter.lora_B.weight)

    def to_base_layout(self, delta):
        return delta.T  # (dim, num) -> (num, dim)

    def as_matrix(self, weight):
        return weight.T  # (num, dim) -> (dim, num)
