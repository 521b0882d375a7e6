from athwe.training.trainer import Trainer, evaluate_run, load_data, train

__all__ = ["Trainer", "evaluate_run", "load_data", "train"]
