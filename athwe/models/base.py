"""The model contract the harness relies on, and the registry of models by name.

A model is an nn.Module with:
- ``forward(input_ids, ...)``: its sequence encoding, written out in the model's own file;
- ``loss(batch)``: scalar training loss for a Batch (``layers.ranking_loss`` plus the model's own
  auxiliary terms);
- ``scores(batch)``: (B, n_items + 1) scores of every item;
- ``query_vectors(batch)`` (B, D) and ``item_vectors()`` (n_items + 1, D) whose inner product
  equals ``scores`` (so an inner-product index reproduces the model's ranking exactly).
A model keeps no results from one call for the next.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any, Callable

import torch
from torch import nn

from athwe.config import LOSSES, coerce_setting
from athwe.dataset.split import Batch, SampleSet
from athwe.errors import ConfigError


def stack_blocks(make: Callable[[], nn.Module], num: int, copy_first: bool = False) -> nn.ModuleList:
    """`num` blocks from `make()`: each built afresh, or (``copy_first``) the first one built and
    deep-copied, so its parameters' initial values repeat in every block."""
    if not copy_first or num <= 1:
        return nn.ModuleList(make() for _ in range(num))
    first = make()
    return nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num - 1)])


@dataclasses.dataclass
class EncoderConfig:
    """The settings every model's encoder shares (each model's config extends it, and may change a
    default: BSARec uses one head, ASRec a width of 256)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner_size: int = 256
    hidden_dropout: float = 0.5
    attn_dropout: float = 0.5
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    # CE over the padding column too, as a negative (the BSARec/WEARec and RecBole code score all
    # n_items + 1 embedding rows, so the padding row is trained); default: padding is left out
    ce_padding: bool = False
    # build one block and deep-copy it for the others, as the reference code bases do
    # (copy.deepcopy of the first layer): parameters the weight init leaves alone (WEARec's
    # wavelet scale T, BSARec's beta, ASRec's SAMM parameters) then start equal in every layer;
    # Linear, Embedding and LayerNorm are redrawn per layer either way. Default: drawn per layer
    copy_first_block: bool = False

    def __post_init__(self) -> None:
        """Check every plain-typed setting's type (ints given for floats are widened; YAML 1.1
        reads 1.5e7 as a string, so numeric strings are accepted for floats) and the shared sizes,
        so a bad value is a one-line ConfigError here rather than a failure deep in a layer."""
        name = type(self).__name__.removesuffix("Config").lower()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, typ = getattr(self, f.name), hints[f.name]
            if typ is float and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            setattr(self, f.name, coerce_setting(name, f.name, value, typ))
        for key in ("hidden_size", "num_layers", "num_heads", "inner_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}: {key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{name}: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_heads {self.num_heads}")
        for key in ("hidden_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{name}: {key} must be in [0, 1), got {getattr(self, key)}")
        if self.layer_norm_eps <= 0 or self.initializer_range < 0:
            raise ConfigError(f"{name}: layer_norm_eps must be > 0 and initializer_range >= 0, "
                              f"got {self.layer_norm_eps}, {self.initializer_range}")


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``forward``, ``loss``, ``query_vectors`` and ``item_vectors``."""

    #: True when outputs ignore padded positions exactly, so evaluation may drop all-padding columns
    supports_trimming: bool = False

    def __init__(self, config: Any, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__()
        if loss_type not in LOSSES:
            raise ConfigError(f"unknown loss {loss_type!r} (one of {', '.join(LOSSES)})")
        self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.loss_type = loss_type

    @property
    def uses_timestamps(self) -> bool:
        """True when the query vectors depend on the input timestamps (so serving a history needs them)."""
        return False

    def prepare(self, train: SampleSet) -> None:
        """Hook called once with the training samples before training (e.g. to precompute positives)."""

    def training_notes(self, train: SampleSet) -> list[str]:
        """One-line remarks on how this model's settings meet the training data (e.g. an input that
        carries no signal under the current config); the trainer prints them before training."""
        return []

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, batch: Batch) -> torch.Tensor:
        return self.query_vectors(batch) @ self.item_vectors().t()


@dataclasses.dataclass
class ModelEntry:
    cls: type[SequentialRecommender]
    config_cls: type
    description: str
    needs_features: bool = False  # built with the dataset's item features (create_model(features=...))


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, description: str = "", needs_features: bool = False) -> Callable:
    def deco(cls: type[SequentialRecommender]) -> type[SequentialRecommender]:
        _REGISTRY[name] = ModelEntry(cls, config_cls, description or (cls.__doc__ or "").strip().split("\n")[0],
                                     needs_features)
        return cls
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r} (available: {', '.join(list_models())})")
    return _REGISTRY[name]


def unused_model_keys(name: str, values: dict[str, Any]) -> set[str]:
    """The settings in `values` (a model's settings as written in a config) that cannot change
    what model `name` computes given the rest, such as ATHWE's expert settings with its mixture of
    experts off; empty for a model that declares none (its config class has no ``unused_keys``) or
    an unknown name."""
    entry = _REGISTRY.get(name)
    unused = getattr(entry.config_cls, "unused_keys", None) if entry is not None else None
    return set(unused(values)) if unused is not None else set()


def build_model_config(name: str, values: dict[str, Any] | None = None) -> Any:
    """The model's config dataclass from a dict; unknown keys are an error."""
    cls = get_entry(name).config_cls
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown model key(s) for {name}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)


def resolved_model_args(name: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting of model `name` given `values`: the config dataclass's defaults filled in and
    variant-dependent settings resolved (FEARec's topk_factor under ``variant: bsarec``). A run's
    config.yaml holds these, so a default changed in a later release does not change what an
    existing run means when it is resumed, evaluated or matched."""
    return dataclasses.asdict(build_model_config(name, values))


def create_model(name: str, n_items: int, max_seq_length: int, model_config: Any = None,
                 loss_type: str = "ce", features: Any = None) -> SequentialRecommender:
    """The one factory entry point: a model by registry name. `features` (a feature-store
    FeatureSet) goes to models registered with needs_features and is ignored by the others."""
    entry = get_entry(name)
    if model_config is None or isinstance(model_config, dict):
        model_config = build_model_config(name, model_config)
    kwargs = {"features": features} if entry.needs_features else {}
    try:
        return entry.cls(model_config, n_items=n_items, max_seq_length=max_seq_length, loss_type=loss_type, **kwargs)
    except ValueError as e:  # a layer refusing its sizes: a config problem, reported as one line
        raise ConfigError(f"{name}: invalid model settings ({e})") from None
