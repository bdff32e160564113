"""Training: data and tasks, the loop (resumable, distributed), metrics and evaluation."""

from .config import TrainConfig, TrainResult
from .loop import resume, train

__all__ = ["TrainConfig", "TrainResult", "train", "resume"]
