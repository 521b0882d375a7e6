"""Typed run configuration: dataclass defaults, YAML files and command-line overrides.

Precedence, lowest to highest:
1. dataclass defaults below (and the model's own config dataclass);
2. ``athwe/configs/datasets/<dataset>.yaml`` (package data, see `config_dir`);
3. ``athwe/configs/<model>.yaml`` (its top-level sections);
4. ``athwe/configs/<model>.yaml`` section ``datasets: <dataset>:`` (published per-dataset settings);
5. ``--config FILE`` (same layout: ``model``, ``data``, ``train``, ``model_args``);
6. ``--set section.key=value`` overrides, then dedicated CLI flags (``--epochs``, ``--lr``, ...).
An unknown section or key anywhere is an error. The resolved config is saved in every run folder.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from athwe.errors import ConfigError

if typing.TYPE_CHECKING:
    from importlib.resources.abc import Traversable


@dataclass
class DataConfig:
    dataset: str = "demo"
    data_dir: str = "dataset"
    preset: str = "bsarec"  # bsarec | recbole (specs/protocol.md)
    max_seq_length: int = 50
    kcore: int = 0  # 0 = no filtering
    history: str = "preset"  # preset | none | zero | exclude (evaluation history handling)


@dataclass
class TrainConfig:
    loss: str = "ce"  # ce (all items) | bce (one sampled negative)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 200
    patience: int = 10
    valid_metric: str = "NDCG@20"
    seed: int = 42
    eval_batch_size: int = 1024
    device: str = "auto"  # auto = CUDA when present, else CPU
    num_threads: int = 0  # 0 = torch default
    precision: str = "fp32"  # fp32 | bf16 (training steps under bfloat16 autocast; evaluation stays fp32)
    runs_dir: str = "runs"


@dataclass
class RunConfig:
    model: str = "athwe"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "train": TrainConfig}
#: train.precision: fp32, or bf16 = mixed precision (autocast: matrix products and convolutions in
#: bfloat16; parameters, optimizer state, reductions and losses in float32)
PRECISIONS = ("fp32", "bf16")
#: train.loss: ce = cross-entropy over all items, bce = one sampled negative per target
LOSSES = ("ce", "bce")


def config_dir() -> Path | Traversable:
    """Where the model and dataset YAML defaults live: $ATHWE_CONFIG_DIR when set (tests, edited
    copies of the defaults), else the package's own ``athwe/configs``, read through importlib.resources
    so that an installed (non-editable) package finds them as a source checkout does."""
    env = os.environ.get("ATHWE_CONFIG_DIR")
    if env:
        return Path(env)
    return resources.files("athwe") / "configs"


def load_yaml(path: str | Path | Traversable) -> dict[str, Any]:
    """The mapping in a YAML file: a user's path or a packaged resource (`config_dir`); an empty
    file is an empty mapping, anything else but a mapping a ConfigError."""
    if isinstance(path, str):
        path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return obj


def coerce_setting(where: str, key: str, value: Any, typ: Any) -> Any:
    """`value` for a setting annotated `typ`: ints widened to float; ConfigError for a wrong plain type."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool):
        if isinstance(value, bool) != (typ is bool) or not isinstance(value, typ):
            raise ConfigError(f"{where}: {key} must be {typ.__name__}, got {value!r}")
    return value


def _apply_section(obj: Any, values: dict[str, Any], where: str, section: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section {section!r} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(f"{where}: unknown key {section}.{k} (known: {', '.join(hints)})")
        setattr(obj, k, coerce_setting(where, f"{section}.{k}", v, hints[k]))


def merge_layer(cfg: RunConfig, layer: dict[str, Any], where: str, allow_datasets: bool = False) -> None:
    """Apply one YAML-shaped mapping onto cfg in place."""
    for key, val in layer.items():
        if key == "model":
            cfg.model = coerce_setting(where, "model", val, str)
        elif key in SECTIONS:
            _apply_section(getattr(cfg, key), val, where, key)
        elif key == "model_args":
            if not isinstance(val, dict):
                raise ConfigError(f"{where}: section 'model_args' must be a mapping")
            cfg.model_args.update(val)
        elif key == "datasets" and allow_datasets:
            continue
        else:
            raise ConfigError(f"{where}: unknown section {key!r} (known: model, data, train, model_args)")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=5e-4' -> ('train.lr', 0.0005); values are YAML scalars (never eval'd)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_config(model: str | None = None, dataset: str | None = None, config_file: str | None = None,
                   overrides: list[str] | None = None, flags: dict[str, Any] | None = None) -> RunConfig:
    """Build the run config following the documented precedence."""
    file_layer = load_yaml(config_file) if config_file else {}
    override_layer: dict[str, Any] = {}
    for text in overrides or []:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts == ["model"]:
            override_layer["model"] = value
        elif len(parts) == 2:
            override_layer.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(f"override {text!r}: key must be model or section.key")
    flag_layer: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        section, name = key.split(".")
        flag_layer.setdefault(section, {})[name] = value

    model = model or override_layer.get("model") or file_layer.get("model") or RunConfig.model
    dataset = (dataset or override_layer.get("data", {}).get("dataset")
               or file_layer.get("data", {}).get("dataset") or DataConfig.dataset)
    cfg = RunConfig(model=model)
    cfg.data.dataset = dataset
    cdir = config_dir()
    ds_file = cdir / "datasets" / f"{dataset}.yaml"
    if ds_file.is_file():
        merge_layer(cfg, load_yaml(ds_file), str(ds_file))
    model_file = cdir / f"{model}.yaml"
    if model_file.is_file():
        m = load_yaml(model_file)
        merge_layer(cfg, m, str(model_file), allow_datasets=True)
        per_ds = (m.get("datasets") or {}).get(dataset)
        if per_ds:
            merge_layer(cfg, per_ds, f"{model_file} (datasets.{dataset})")
    merge_layer(cfg, file_layer, str(config_file))
    merge_layer(cfg, override_layer, "--set")
    merge_layer(cfg, flag_layer, "command line")
    cfg.model, cfg.data.dataset = model, dataset
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check every data and train setting; model settings are checked by the model's config class
    (athwe.models.check_run_config), since this module imports no model."""
    from athwe.dataset.split import PRESETS
    from athwe.evaluation.metrics import HISTORY_MODES, KS

    if cfg.data.preset not in PRESETS:
        raise ConfigError(f"data.preset {cfg.data.preset!r} is not one of {', '.join(PRESETS)}")
    if cfg.data.history not in ("preset",) + HISTORY_MODES:
        raise ConfigError(f"data.history {cfg.data.history!r} is not one of preset, {', '.join(HISTORY_MODES)}")
    if cfg.train.loss not in LOSSES:
        raise ConfigError(f"train.loss {cfg.train.loss!r} is not one of {', '.join(LOSSES)}")
    valid_metrics = {f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in KS}
    if cfg.train.valid_metric not in valid_metrics:
        raise ConfigError(f"train.valid_metric {cfg.train.valid_metric!r} is not one of "
                          f"{', '.join(sorted(valid_metrics))}")
    t = cfg.train
    for key, value in (("data.max_seq_length", cfg.data.max_seq_length), ("train.batch_size", t.batch_size),
                       ("train.eval_batch_size", t.eval_batch_size), ("train.epochs", t.epochs),
                       ("train.patience", t.patience)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if not 0 < t.lr < math.inf:  # also false for NaN
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
    if not 0 <= t.weight_decay < math.inf:
        raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if t.num_threads < 0:
        raise ConfigError(f"train.num_threads must be >= 0 (0 = torch's default), got {t.num_threads}")
    if cfg.data.kcore < 0:
        raise ConfigError(f"data.kcore must be >= 0 (0 = no filtering), got {cfg.data.kcore}")
    if not isinstance(cfg.model, str) or not isinstance(cfg.model_args, dict):
        raise ConfigError(f"model must be a name and model_args a mapping, got {cfg.model!r}, {cfg.model_args!r}")


def history_mode(cfg: RunConfig) -> str:
    from athwe.dataset.split import PRESET_HISTORY

    return PRESET_HISTORY[cfg.data.preset] if cfg.data.history == "preset" else cfg.data.history


def config_from_dict(d: dict[str, Any], where: str = "saved config") -> RunConfig:
    """A run's saved config (its config.yaml), its data and train settings checked as a fresh one's are
    (model settings: athwe.models.check_run_config); `where` names it in errors."""
    margs = d.get("model_args") or {}
    if not isinstance(margs, dict):
        raise ConfigError(f"{where}: section 'model_args' must be a mapping")
    cfg = RunConfig(model=d["model"], model_args=dict(margs))
    _apply_section(cfg.data, d.get("data") or {}, where, "data")
    _apply_section(cfg.train, d.get("train") or {}, where, "train")
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg
