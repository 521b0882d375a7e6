from athwe.evaluation.metrics import HISTORY_MODES, KS, evaluate, metrics_from_ranks, rank_of_target

__all__ = ["HISTORY_MODES", "KS", "evaluate", "metrics_from_ranks", "rank_of_target"]
