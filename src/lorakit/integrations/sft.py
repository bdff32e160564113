"""TRL's ``SFTTrainer`` over a lorakit model (needs the ``trl`` extra): see :mod:`lorakit.integrations.trainer`."""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import LoraTrainerMixin


class LoraSFTTrainer(LoraTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose checkpoints, ``save_model`` and best-model restore use the adapter."""
