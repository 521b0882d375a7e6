"""Training: the trainer (athwe.training.trainer) and torchrun data parallelism."""
from athwe.training.trainer import Trainer, resume, train

__all__ = ["Trainer", "resume", "train"]
