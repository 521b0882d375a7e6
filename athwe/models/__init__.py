"""Model registry. Importing this package registers every built-in model."""
from typing import Any

from athwe.config import RunConfig, validate
from athwe.errors import ConfigError
from athwe.models import asrec, athwe, bsarec, fearec, sasrec, wearec  # noqa: F401  (registers)
from athwe.models.base import (SequentialRecommender, build_model_config, create_model, get_entry, list_models,
                               resolved_model_args, unused_model_keys)


def check_run_config(cfg: RunConfig, where: str | None = None) -> Any:
    """Check a whole run config, model settings included; returns the model's config object.
    `where` (e.g. a run's config.yaml) prefixes the error message."""
    try:
        validate(cfg)
        return build_model_config(cfg.model, cfg.model_args)
    except ConfigError as e:
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}") from None


__all__ = ["SequentialRecommender", "build_model_config", "check_run_config", "create_model", "get_entry",
           "list_models", "resolved_model_args", "unused_model_keys"]
