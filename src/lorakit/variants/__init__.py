"""Successors of plain LoRA, each registering into core's tables explicitly."""
