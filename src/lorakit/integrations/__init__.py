"""lorakit inside the Hugging Face training stack (needs transformers: the ``hf`` extra).

``LoraTrainer`` is ``transformers.Trainer`` for a model adapted with :func:`lorakit.add_lora`: checkpoints,
``save_model`` and ``load_best_model_at_end`` use the adapter in PEFT's format. ``LoraTrainerMixin`` does
the same for any ``Trainer`` subclass; TRL's ``SFTTrainer`` is ready-made in
:mod:`lorakit.integrations.sft` (``LoraSFTTrainer``, needs the ``trl`` extra).
"""

from .trainer import LoraTrainer, LoraTrainerMixin, restore_adapters

__all__ = ["LoraTrainer", "LoraTrainerMixin", "restore_adapters"]
