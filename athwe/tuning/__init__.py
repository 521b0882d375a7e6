"""Hyper-parameter studies over the trainer (Optuna): `athwe tune`."""
from athwe.tuning.study import (DB, TRIALS_MD, Param, Space, StudySettings, apply_settings, check_space, config_diff,
                                default_pruner, load_space, parse_space, run_study, sample, space_path, study_lock,
                                trial_dir, with_available_features)

__all__ = ["DB", "TRIALS_MD", "Param", "Space", "StudySettings", "apply_settings", "check_space", "config_diff",
           "default_pruner", "load_space", "parse_space", "run_study", "sample", "space_path", "study_lock",
           "trial_dir", "with_available_features"]
