"""Item features for ATHWE: text, image and category tensors, extracted once and stored on disk.

`load_features(dataset_dir, item_tokens)` reads them (see store.py); `extract_features(...)`
(extract.py, what `athwe extract` runs) produces them. Heavy libraries are imported only when
extraction runs.
"""
from athwe.feature_extraction.store import FeatureSet, features_dir, load_features

__all__ = ["FeatureSet", "extract_features", "features_dir", "load_features"]


def __getattr__(name: str):
    if name == "extract_features":
        from athwe.feature_extraction.extract import extract_features

        return extract_features
    raise AttributeError(name)
