"""Successors of plain LoRA, each a plug-in that registers into core's tables explicitly."""
