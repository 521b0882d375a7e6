"""Model registry. Importing this package registers every built-in model."""
from athwe.models import asrec, athwe, bsarec, fearec, sasrec, wearec  # noqa: F401  (registers)
from athwe.models.base import (SequentialRecommender, build_model_config, create_model, get_entry, list_models,
                               resolved_model_args, unused_model_keys)

__all__ = ["SequentialRecommender", "build_model_config", "create_model", "get_entry", "list_models",
           "resolved_model_args", "unused_model_keys"]
