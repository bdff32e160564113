"""The successors of plain LoRA, each a plug-in that joins core's tables (:mod:`lorakit.core.tables`).

- :mod:`.slices`: fused slices, LoRA on chosen output slices of a fused projection (GPT-2's ``c_attn``).
- :mod:`.heads`: an adapter's own classification head: class names recorded, the number of classes read.
- :mod:`.dora`: DoRA, a magnitude per output feature times a normalised direction.
- :mod:`.adalora`: AdaLoRA's SVD-form adapters and rank allocator.
- :mod:`.inits`: PiSSA, OLoRA and LoftQ, initialisers that read (and replace) the base weight.
- :mod:`.quantized`: QLoRA, LoRA on bitsandbytes' 4-bit and 8-bit base layers.
- :mod:`.loraplus`: LoRA+ optimizer parameter groups.
- :mod:`.params`: LoRA on parameters and MoE experts (``LoraConfig.target_parameters``); :mod:`.param_targets`
  finds the parameters, reads a checkpoint's expert stacks by parameter path and plugs the field into core.
- :mod:`.tokens`: trainable tokens (``trainable_token_indices``), chosen embedding rows trained.
- :mod:`.derived`: values derived from weights (DoRA's row norms, the expert pairs' grouped layout), kept for
  inference while the weights are unchanged.

Importing a module here registers nothing: :func:`register` (called once by ``import lorakit``) does.

The seam (the contract variants build on)
-----------------------------------------

**Adapter variants** change what an adapter computes. A variant is a subclass of
:class:`~lorakit.core.layers.Adapter` (as :class:`~lorakit.variants.slices.SlicedAdapter` is) registered in
:data:`~lorakit.core.tables.VARIANTS`; ``LoraLayer``, checkpoints and the per-row path never ask which one
they hold. A variant class provides:

- ``wanted(config) -> bool`` (classmethod): whether a ``LoraConfig`` (or a subclass of it) asks for it.
- ``wrap(layer, plain) -> Adapter`` (classmethod): build the variant from the plain adapter the layer
  type made (its ``lora_A``, ``lora_B``, dropout, scaling, config are reused as they are) after the
  initialiser ran. Raise ``ValueError`` naming the layer type for what it cannot do.
- ``layer_output(layer, out, x, inplace)``: the layer's output; ``out = layer.base_layer(x)`` (bias included).
- ``merged_weight(layer, w)`` / ``unmerged_weight(layer, w)``: fold in / take out, on the fp32 base
  weight in the base layout; ``unmerged_weight(merged_weight(w)) == w`` to fp32 rounding.
- ``extra_tensors()``: checkpoint tensors besides A and B, by key suffix after the module path;
  ``export_tensors()`` / ``export_pattern(alpha)``: what a checkpoint holds when it is not the adapter's own
  ``lora_A``/``lora_B`` (the equivalent plain pair, its rank and alpha).
- ``additive = False`` unless the output is exactly ``base + B·A·x·scaling`` with ``plain_pair()``:
  ``combine_adapters`` and plain-LoRA conversion refuse non-additive adapters.
- Per-row batches (``per_row_adapters``, the serve pool): ``row_batched`` (an additive adapter, or one giving a
  per-output factor ``row_scale(layer)``, as DoRA) is stacked with the others; ``row_wise = True`` says that row
  ``i``'s output depends on row ``i`` only, so the adapter's own ``layer_output`` runs on its rows of the batch
  (trainable tokens). A layer with ``routes_rows = True`` gets the rows' adapter names instead
  (``row_plan.names``) and runs them itself (MoE experts: ``ParamLayer.row_forward``; its adapters say
  ``row_batched`` where it can). An adapter that says neither is refused by name.

What a variant may read from the layer (never ``if isinstance`` on layer types): ``layer.base_layer``,
``layer.base_weight()`` / ``layer.write_base(w)`` (the base weight in its layout, detached; a quantized
layer dequantizes / requantizes there), ``layer.weight_matrix()`` (the base weight as ``(d, k)``: d
outputs, k inputs), ``layer.as_matrix(w)`` / ``layer.to_base_layout(m)`` (between the base layout and
``(d, k)``), ``layer.feature_view(v)`` (a ``(d,)`` vector shaped to broadcast against the output).

**Initialisers** set an adapter's A and B when it is built: :data:`~lorakit.core.tables.INITIALIZERS`
maps a name (PEFT's ``init_lora_weights`` value; ``"pissa_niter_16"`` is the counted entry ``"pissa_niter"``
with argument 16) to an :class:`~lorakit.core.tables.Init`; see :mod:`.inits` for the base-change contract.
"""

from __future__ import annotations

from . import adalora, dora, heads, inits, param_targets, params, quantized, slices, tokens
from .adalora import AdaLoraAllocator, AdaLoraConfig
from .loraplus import loraplus_param_groups
from .quantized import merge_errors, quantize


def register() -> None:
    """Put every variant into core's tables; calling it again changes nothing."""
    slices.register()
    heads.register()
    dora.register()
    adalora.register()
    inits.register()
    quantized.register()
    params.register()
    param_targets.register()  # before tokens: trainable tokens see the parameter layers
    tokens.register()


__all__ = ["register", "AdaLoraConfig", "AdaLoraAllocator", "loraplus_param_groups", "quantize", "merge_errors"]
