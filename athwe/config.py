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
    num_threads: int = 0  # 0 = the CPUs other processes leave free when the run starts
    precision: str = "fp32"  # fp32 | bf16 (training steps under bfloat16 autocast; evaluation stays fp32)
    runs_dir: str = "runs"
    tensorboard: bool = True  # TensorBoard event files in the run folder (`tensorboard --logdir runs`)


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
        raise ConfigError(f"{path}: {'a folder, not a YAML file' if path.is_dir() else 'config file not found'}")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (model, data, train, model_args), "
                          f"got {describe(obj)}")
    return obj


def describe(value: Any) -> str:
    """What a YAML value is, for errors: 'a list', 'a string ('x')', 'an integer (5)', ..."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})" if abs(value) < 10**30 else "an integer with more than 30 digits"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def coerce_setting(where: str, key: str, value: Any, typ: Any) -> Any:
    """`value` for a setting annotated `typ`: ints and numeric strings (YAML 1.1 reads 1e-3 as a string)
    widened to float; a ConfigError naming `where` (when given) and `key` for a wrong plain type."""
    at = f"{where}: " if where else ""
    if typ is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{at}key {key} is too large, got {describe(value)}") from None
    if typ in (int, float, str, bool):
        if isinstance(value, bool) != (typ is bool) or not isinstance(value, typ):
            raise ConfigError(f"{at}key {key} must be {typ.__name__}, got {describe(value)}")
    return value


def _apply_section(obj: Any, values: Any, where: str, section: str) -> None:
    """Set one section's settings on `obj` (DataConfig or TrainConfig), each checked by type; an empty
    (null) section changes nothing."""
    if values is None:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section {section!r} must be a mapping, got {describe(values)}")
    hints = typing.get_type_hints(type(obj))
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(f"{where}: unknown key {section}.{k} (known: {', '.join(hints)})")
        setattr(obj, k, coerce_setting(where, f"{section}.{k}", v, hints[k]))


def merge_layer(cfg: RunConfig, layer: Any, where: str, allow_datasets: bool = False, prefix: str = "") -> None:
    """Apply one YAML-shaped mapping onto cfg in place, checking its shape and every value's type as it
    goes (a model YAML's ``datasets:`` sections, when allowed, are checked whole but not applied);
    `prefix` names a nested layer's keys in errors."""
    if not isinstance(layer, dict):
        what = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigError(f"{where}: {what} must be a mapping, got {describe(layer)}")
    for key, val in layer.items():
        if key == "model":
            cfg.model = coerce_setting(where, f"{prefix}model", val, str)
        elif key in SECTIONS:
            _apply_section(getattr(cfg, key), val, where, f"{prefix}{key}")
        elif key == "model_args":
            if val is None:
                continue
            if not isinstance(val, dict):
                raise ConfigError(f"{where}: section '{prefix}model_args' must be a mapping, got {describe(val)}")
            bad = [k for k in val if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"{where}: section '{prefix}model_args' must map setting names to values, "
                                  f"got the key {bad[0]!r}")
            cfg.model_args.update(val)
        elif key == "datasets" and allow_datasets:
            if val is None:
                continue
            if not isinstance(val, dict):
                raise ConfigError(f"{where}: section 'datasets' must map dataset names to sections, "
                                  f"got {describe(val)}")
            for name, section in val.items():
                if section is not None:  # checked on a scratch config: applied later, for its dataset only
                    check_layer(section, where, prefix=f"datasets.{name}.")
        else:
            known = "model, data, train, model_args" + (", datasets" if allow_datasets else "")
            raise ConfigError(f"{where}: unknown section {f'{prefix}{key}'!r} (known: {known})")


def check_layer(layer: Any, where: str, allow_datasets: bool = False, prefix: str = "") -> None:
    """Check one layer whole, before any of its values is used: its shape and types (merge_layer), then
    its values' ranges (validate) on a scratch config of defaults, so that an error names the layer."""
    scratch = RunConfig()
    merge_layer(scratch, layer, where, allow_datasets, prefix)
    try:
        validate(scratch)
    except ConfigError as e:
        raise ConfigError(f"{where}: {prefix}{e}" if prefix else f"{where}: {e}") from None


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
    """Build the run config following the documented precedence. Every layer is checked for shape and
    types (on a scratch config) before any of its values is used, e.g. to find the model's YAML."""
    file_layer = load_yaml(config_file) if config_file else {}
    check_layer(file_layer, str(config_file))
    override_layer: dict[str, Any] = {}
    for text in overrides or []:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts == ["model"]:
            override_layer["model"] = value
        elif len(parts) == 2 and parts[0] != "model":
            override_layer.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(f"--set {text!r}: the key must be model or section.key (e.g. train.lr)")
    check_layer(override_layer, "--set")
    flag_layer: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        section, name = key.split(".")
        flag_layer.setdefault(section, {})[name] = value
    check_layer(flag_layer, "command line")

    model = model or override_layer.get("model") or file_layer.get("model") or RunConfig.model
    dataset = (dataset or override_layer.get("data", {}).get("dataset")
               or (file_layer.get("data") or {}).get("dataset") or DataConfig.dataset)
    cfg = RunConfig(model=model)
    cfg.data.dataset = dataset
    cdir = config_dir()
    ds_file = cdir / "datasets" / f"{dataset}.yaml"
    if ds_file.is_file():
        ds_layer = load_yaml(ds_file)
        check_layer(ds_layer, str(ds_file))
        merge_layer(cfg, ds_layer, str(ds_file))
    model_file = cdir / f"{model}.yaml"
    if model_file.is_file():
        m = load_yaml(model_file)
        check_layer(m, str(model_file), allow_datasets=True)
        merge_layer(cfg, m, str(model_file), allow_datasets=True)
        per_ds = (m.get("datasets") or {}).get(dataset)
        if per_ds:
            merge_layer(cfg, per_ds, str(model_file), prefix=f"datasets.{dataset}.")
    merge_layer(cfg, file_layer, str(config_file))
    merge_layer(cfg, override_layer, "--set")
    merge_layer(cfg, flag_layer, "command line")
    cfg.model, cfg.data.dataset = model, dataset
    validate(cfg)
    return cfg


#: the smallest and largest value of each whole-number setting (and how the largest reads in an error):
#: a value outside is a typo or a unit mix-up, refused before it allocates, overflows or loops for ever
MAX_BATCH = 10**7
MAX_THREADS = 4096
MAX_SEQ_LENGTH = 10**5
MAX_KCORE = 10**9
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "data.max_seq_length": (1, MAX_SEQ_LENGTH, f"{MAX_SEQ_LENGTH:,}"),
    "data.kcore": (0, MAX_KCORE, f"{MAX_KCORE:,}"),
    "train.batch_size": (1, MAX_BATCH, f"{MAX_BATCH:,}"),
    "train.eval_batch_size": (1, MAX_BATCH, f"{MAX_BATCH:,}"),
    "train.epochs": (1, MAX_BATCH, f"{MAX_BATCH:,}"),
    "train.patience": (1, MAX_BATCH, f"{MAX_BATCH:,}"),
    "train.seed": (0, 2**63 - 1, "2**63 - 1"),
    "train.num_threads": (0, MAX_THREADS, f"{MAX_THREADS:,}"),
}
#: what 0 means, for the settings where it is allowed
ZERO_MEANS = {"data.kcore": "0 = no filtering", "train.num_threads": "0 = the free CPUs"}


def check_range(name: str, value: int, lo: int, hi: int, hi_text: str | None = None, zero: str | None = None) -> None:
    """A ConfigError naming `name` when `value` is outside lo..hi (`zero`: what 0 means, when allowed)."""
    if value < lo:
        low = ">= 0" if lo == 0 else f"at least {lo:,}"
        note = f" ({zero})" if zero else ""
        raise ConfigError(f"{name} must be {low}{note}, got {value}")
    if value > hi:
        shown = f"{value:,}" if value < 10**30 else "a number with more than 30 digits"
        raise ConfigError(f"{name} must be at most {hi_text or f'{hi:,}'}, got {shown}")


def check_int_setting(key: str, value: int) -> None:
    """The range check of one whole-number data or train setting (INT_RANGES), e.g. "train.seed"."""
    lo, hi, hi_text = INT_RANGES[key]
    check_range(key, value, lo, hi, hi_text, ZERO_MEANS.get(key))


def validate(cfg: RunConfig) -> None:
    """Check every data and train setting (type, then allowed values and ranges); model settings are
    checked by the model's config class (athwe.models.check_run_config), since this module imports no model.
    A config assembled in Python is checked as one read from YAML is."""
    from athwe.dataset.split import PRESETS
    from athwe.evaluation.metrics import HISTORY_MODES, KS

    if not isinstance(cfg.model, str):
        raise ConfigError(f"model must be a model name (a string), got {describe(cfg.model)}")
    if not isinstance(cfg.model_args, dict):
        raise ConfigError(f"section 'model_args' must be a mapping, got {describe(cfg.model_args)}")
    for section, obj in (("data", cfg.data), ("train", cfg.train)):
        for key, typ in typing.get_type_hints(type(obj)).items():
            setattr(obj, key, coerce_setting("", f"{section}.{key}", getattr(obj, key), typ))
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
    for key in INT_RANGES:
        section, name = key.split(".")
        check_int_setting(key, getattr(getattr(cfg, section), name))
    t = cfg.train
    if not 0 < t.lr < math.inf:  # also false for NaN
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
    if not 0 <= t.weight_decay < math.inf:
        raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision {t.precision!r} is not one of {', '.join(PRECISIONS)}")


def history_mode(cfg: RunConfig) -> str:
    from athwe.dataset.split import PRESET_HISTORY

    return PRESET_HISTORY[cfg.data.preset] if cfg.data.history == "preset" else cfg.data.history


def config_from_dict(d: Any, where: str = "saved config") -> RunConfig:
    """A run's saved config (its config.yaml), its shape, types and data and train settings checked as a
    fresh one's are (model settings: athwe.models.check_run_config); `where` names it in errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {describe(d)}")
    if not isinstance(d.get("model"), str):
        raise ConfigError(f"{where}: key model must be a model name (a string), got {describe(d.get('model'))}")
    margs = d.get("model_args")
    if margs is not None and not isinstance(margs, dict):
        raise ConfigError(f"{where}: section 'model_args' must be a mapping, got {describe(margs)}")
    cfg = RunConfig(model=d["model"], model_args=dict(margs or {}))
    _apply_section(cfg.data, d.get("data"), where, "data")
    _apply_section(cfg.train, d.get("train"), where, "train")
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg
