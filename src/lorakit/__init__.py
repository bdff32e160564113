"""lorakit: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685) for any PyTorch model.

    import lorakit
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train...
    lorakit.save_adapter(model, "out/adapter")       # PEFT/vLLM-loadable
    lorakit.merge(model)                              # zero added latency
"""

from . import layers, ops, save_guard, variants
from .core.checkpoint import load_adapter, lora_state_dict, save_adapter
from .core.config import LoraConfig
from .core.model import (
    active_adapter,
    adapter_config,
    adapter_names,
    add_lora,
    delete_adapter,
    disabled,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
    use_adapter,
)
from .hotswap import hotswap_adapter, prepare_for_hotswap
from .ops.combine import combine_adapters
from .ops.per_row import per_row_adapters
from .variants import AdaLoraAllocator, AdaLoraConfig, loraplus_param_groups, merge_errors, quantize

layers.register()  # Embedding and Conv layers join core's layer table (idempotent)
ops.register()  # modules_to_save copies under per-row adapters
save_guard.register()  # model.save_pretrained refuses while lorakit layers are in the model
variants.register()  # DoRA, AdaLoRA, PiSSA/OLoRA/LoftQ, quantized bases join core's tables (idempotent)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "add_lora",
    "trainable_parameters",
    "adapter_names",
    "active_adapter",
    "adapter_config",
    "set_adapter",
    "delete_adapter",
    "merge",
    "unmerge",
    "unload",
    "disabled",
    "use_adapter",
    "per_row_adapters",
    "combine_adapters",
    "prepare_for_hotswap",
    "hotswap_adapter",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "quantize",
    "merge_errors",
    "loraplus_param_groups",
    "AdaLoraConfig",
    "AdaLoraAllocator",
]
