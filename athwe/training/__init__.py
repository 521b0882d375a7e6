"""Training: the trainer (athwe.training.trainer) and torchrun data parallelism."""
from athwe.training.trainer import StopTraining, Trainer, resume, train

__all__ = ["StopTraining", "Trainer", "resume", "train"]
