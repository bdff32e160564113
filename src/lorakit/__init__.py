"""lorakit: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685) for any PyTorch model.

    import lorakit
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train...
    lorakit.save_adapter(model, "out/adapter")       # PEFT/vLLM-loadable
    lorakit.merge(model)                              # zero added latency
"""

from .core.adalora import AdaLoraAllocator, AdaLoraConfig
from .core.checkpoint import load_adapter, lora_state_dict, save_adapter
from .core.config import LoraConfig
from .core.model import (
    active_adapter,
    adapter_config,
    adapter_names,
    add_lora,
    combine_adapters,
    delete_adapter,
    disabled,
    merge,
    per_row_adapters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
    use_adapter,
)
from .core.quantized import merge_errors, quantize
from .core.variants import loraplus_param_groups
from .variants import params as _params

_params.register()  # LoraConfig.target_parameters (LoRA on parameters and MoE experts)

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
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "quantize",
    "merge_errors",
    "loraplus_param_groups",
    "AdaLoraConfig",
    "AdaLoraAllocator",
]
