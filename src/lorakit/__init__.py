"""lorakit: Low-Rank Adaptation for PyTorch models."""
