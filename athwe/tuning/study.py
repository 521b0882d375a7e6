"""Hyper-parameter studies over the trainer (Optuna).

A study folder holds
- ``study.db``: the Optuna study (SQLite storage, study name ``athwe``) with the study's settings
  (model, dataset, overrides, the search space, the resolved base config) in its user attributes;
- ``study.lock``: held (flock) by the one process running the study;
- ``trials/trial-NNNN/``: each trial's ordinary run folder (``athwe evaluate / retrieve`` work on it);
- ``best.yaml``, ``trials.md``, ``trials.csv``, ``progress.png``: rewritten after every trial;
- ``tensorboard/trial-NNNN/``: each finished trial's hyper-parameters and objective (HPARAMS tab).

The objective is the best validation value of the config's ``train.valid_metric`` (NDCG@10 on the
recbole-protocol datasets); test metrics are never read. Trials are proposed by a seeded TPE sampler
and cut short by a MedianPruner that sees each epoch's validation value through the trainer's
on_epoch hook. A search space is a YAML file, ``athwe/configs/spaces/<model>.yaml`` by default.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from athwe.config import (DataConfig, RunConfig, TrainConfig, config_dir, config_from_dict, describe, load_yaml,
                          merge_layer, resolve_config)
from athwe.errors import AthweError, ConfigError

# torch, optuna and the trainer are imported where they are used: the CLI imports this module to
# register `athwe tune`, and must start fast
if typing.TYPE_CHECKING:
    import optuna

Printer = Callable[[str], None]

STUDY_NAME = "athwe"  # the same in every folder: one study per study.db
DB = "study.db"
LOCK = "study.lock"
TRIALS = "trials"
TENSORBOARD = "tensorboard"
BEST_YAML = "best.yaml"
TRIALS_MD = "trials.md"
TRIALS_CSV = "trials.csv"
PROGRESS = "progress.png"
#: MedianPruner: a trial is stopped when its validation value at an epoch is below the median of the
#: earlier trials' values at that epoch, but only once 5 trials have finished (a median of fewer is
#: noise) and from epoch 5 on (the first epochs rank settings poorly: a high learning rate leads early)
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 5
#: TPE: the first 10 trials are drawn at random (Optuna's default), later ones from the model
SAMPLER_STARTUP_TRIALS = 10
#: this many failed trials in a row (a setting that crashes every run) stop the study with an error
MAX_FAILURES_IN_A_ROW = 3
#: settings of the study or the machine, not of the model: never searched
NOT_TUNABLE = ("data.dataset", "data.data_dir", "train.runs_dir", "train.valid_metric", "train.seed",
               "train.device", "train.num_threads", "train.eval_batch_size", "train.tensorboard")
KINDS = ("float", "int", "categorical")
SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
             "categorical": {"type", "choices", "divides"}}
#: a study.db's settings format
SETTINGS_VERSION = 1


# -- search spaces ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched setting, named section.key (e.g. model_args.hidden_size)."""

    name: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    divides: str | None = None  # a categorical choice must divide this setting's value

    def labels(self) -> list[Any]:
        """The choices as Optuna holds them: scalars as they are, lists as their JSON text."""
        return [json.dumps(c) if isinstance(c, list) else c for c in self.choices]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        labels = self.labels()
        return self.choices[labels.index(trial.suggest_categorical(self.name, labels))]

    def edge_values(self) -> list[Any]:
        """The values whose validity stands for the whole parameter: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def fit_divisor(self, value: int, total: int) -> int:
        """`value` when it divides `total`, else the largest smaller choice that does (the smallest
        that does when none is smaller): a deterministic stand-in for a combination the model refuses."""
        ok = sorted(c for c in self.choices if total % c == 0)
        if not ok:
            raise ConfigError(f"{self.name}: none of the choices {list(self.choices)} divides "
                              f"{self.divides} {total}")
        below = [c for c in ok if c <= value]
        return below[-1] if below else ok[0]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
            if self.divides:
                d["divides"] = self.divides
            return d
        d.update(low=self.low, high=self.high)
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass
class Space:
    """A model's search space: its parameters in file order (a `divides` target comes first)."""

    source: str  # the file it was read from, for errors
    params: list[Param] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"params": {p.name: p.to_dict() for p in self.params}}

    def names(self) -> list[str]:
        return [p.name for p in self.params]


def space_path(model: str) -> Any:
    """The search space shipped for `model` (athwe/configs/spaces/<model>.yaml, via importlib.resources)."""
    path = config_dir() / "spaces" / f"{model}.yaml"
    if not path.is_file():
        raise ConfigError(f"no search space is shipped for model {model!r}: pass one with --space FILE "
                          f"(format: docs/tuning.md)")
    return path


def load_space(model: str, space_file: str | Path | None = None) -> Space:
    """Read and check a search space for `model`: the given file, else the shipped one."""
    from athwe.models import get_entry

    get_entry(model)  # an unknown model is named before any file is read
    path = Path(space_file) if space_file is not None else space_path(model)
    return parse_space(load_yaml(path), str(path), model)


def parse_space(layer: dict[str, Any], where: str, model: str) -> Space:
    """A Space from a space file's mapping; a ConfigError naming `where` and the parameter on any problem."""
    unknown = sorted(set(layer) - {"params"})
    if unknown:
        raise ConfigError(f"{where}: unknown section {unknown[0]!r} (a space file has one section, params)")
    params = layer.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: section 'params' must map parameter names (e.g. train.lr) to their "
                          f"ranges, got {describe(params)}")
    space = Space(where)
    for name, spec in params.items():
        space.params.append(_parse_param(name, spec, where, model))
    for p in space.params:
        later = space.names()[space.names().index(p.name):]
        if p.divides in later:
            raise ConfigError(f"{where}: parameter {p.name}: divides {p.divides}, which must come before it")
    return space


def _setting_names(model: str) -> dict[str, list[str]]:
    from athwe.models import get_entry

    return {"data": list(typing.get_type_hints(DataConfig)), "train": list(typing.get_type_hints(TrainConfig)),
            "model_args": sorted(f for f in get_entry(model).config_cls.__dataclass_fields__)}


def _check_name(name: Any, where: str, model: str) -> None:
    """A parameter name must be a known data, train or model_args setting that a study may search."""
    section, _, key = name.partition(".") if isinstance(name, str) else ("", "", "")
    known = _setting_names(model)
    if section not in known or not key:
        raise ConfigError(f"{where}: parameter {name!r}: the name must be data.KEY, train.KEY or model_args.KEY")
    if key not in known[section]:
        owner = f"model {model}" if section == "model_args" else f"section {section}"
        raise ConfigError(f"{where}: unknown parameter {name} ({owner} has no setting {key!r}; "
                          f"known: {', '.join(known[section])})")
    if name in NOT_TUNABLE:
        raise ConfigError(f"{where}: parameter {name} is a setting of the study or the machine, not searched")


def _number(where: str, name: str, key: str, value: Any, kind: str) -> float:
    if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        want = "a whole number" if kind == "int" else "a finite number"
        raise ConfigError(f"{where}: parameter {name}: {key} must be {want}, got {describe(value)}")
    return value


def _parse_param(name: Any, spec: Any, where: str, model: str) -> Param:
    _check_name(name, where, model)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: parameter {name} must be a mapping with a type, got {describe(spec)}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}: parameter {name}: type must be one of {', '.join(KINDS)}, got {describe(kind)}")
    extra = sorted(set(spec) - SPEC_KEYS[kind])
    if extra:
        raise ConfigError(f"{where}: parameter {name}: unknown key {extra[0]!r} for a {kind} "
                          f"(known: {', '.join(sorted(SPEC_KEYS[kind]))})")
    if kind == "categorical":
        return _parse_choices(name, spec, where, model)
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{where}: parameter {name}: a {kind} needs low and high")
    low, high = (_number(where, name, k, spec[k], kind) for k in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: parameter {name}: log must be true or false, got {describe(log)}")
    if not low < high:
        raise ConfigError(f"{where}: parameter {name}: bad range, low {low} must be below high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: parameter {name}: bad range, a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(where, name, "step", step, kind)
        if step <= 0 or log:
            raise ConfigError(f"{where}: parameter {name}: step must be > 0 and cannot go with log")
    return Param(name, kind, low=float(low) if kind == "float" else low,
                 high=float(high) if kind == "float" else high, log=log, step=step)


def _parse_choices(name: str, spec: dict[str, Any], where: str, model: str) -> Param:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: parameter {name}: choices must be a non-empty list, got {describe(choices)}")
    scalar = (str, int, float, bool, type(None))
    for c in choices:
        if not (isinstance(c, scalar) or (isinstance(c, list) and all(isinstance(x, scalar) for x in c))):
            raise ConfigError(f"{where}: parameter {name}: a choice must be a value or a list of values, "
                              f"got {describe(c)}")
    texts = [json.dumps(c) for c in choices]
    if len(set(texts)) != len(texts):
        raise ConfigError(f"{where}: parameter {name}: choices repeat a value")
    divides = spec.get("divides")
    if divides is not None:
        if not isinstance(divides, str):
            raise ConfigError(f"{where}: parameter {name}: divides must name a setting, got {describe(divides)}")
        _check_name(divides, where, model)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in choices):
            raise ConfigError(f"{where}: parameter {name}: with divides, every choice must be a whole number >= 1")
    return Param(name, "categorical", choices=tuple(choices), divides=divides)


def check_space(space: Space, cfg: RunConfig) -> None:
    """Every end of every range and every choice, set alone on `cfg`, must give a valid config (a
    `divides` choice with its target set to a multiple of it): a bad range is named before any trial."""
    for p in space.params:
        for value in p.edge_values():
            settings = {p.name: value}
            if p.divides is not None:
                settings[p.divides] = value * max(1, int(current_value(cfg, p.divides)))
            try:
                apply_settings(cfg, settings)
            except ConfigError as e:
                raise ConfigError(f"{space.source}: parameter {p.name}: {json.dumps(value)} is not a valid "
                                  f"value for {cfg.model} ({e})") from None


def with_available_features(space: Space, features: Any) -> Space:
    """The space without the modalities choices that name item features the dataset lacks (image
    without image features); a ConfigError when no choice is left."""
    params = []
    for p in space.params:
        if p.name == "model_args.modalities" and p.kind == "categorical":
            kept = tuple(c for c in p.choices if isinstance(c, list)
                         and all(m == "id" or getattr(features, m, None) is not None for m in c))
            if not kept:
                raise ConfigError(f"{space.source}: parameter {p.name}: every choice needs item features the "
                                  f"dataset does not have")
            p = Param(p.name, p.kind, choices=kept)
        params.append(p)
    return Space(space.source, params)


# -- configs of trials ----------------------------------------------------------------------------------
def current_value(cfg: RunConfig, name: str) -> Any:
    """A setting's value in `cfg` by its dotted name (model settings with their defaults filled in)."""
    from athwe.models import resolved_model_args

    section, key = name.split(".", 1)
    if section == "model_args":
        return resolved_model_args(cfg.model, cfg.model_args)[key]
    return getattr(getattr(cfg, section), key)


def apply_settings(cfg: RunConfig, settings: dict[str, Any], where: str = "search space") -> RunConfig:
    """A copy of `cfg` with the dotted `settings` set, checked whole (model settings included)."""
    from athwe.models import check_run_config

    layer: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        section, key = name.split(".", 1)
        layer.setdefault(section, {})[key] = copy.deepcopy(value)
    out = copy.deepcopy(cfg)
    merge_layer(out, layer, where)
    check_run_config(out)
    return out


def sample(space: Space, trial: optuna.Trial, cfg: RunConfig) -> dict[str, Any]:
    """One trial's settings, drawn in file order; a `divides` choice is fitted to its target's value."""
    settings: dict[str, Any] = {}
    for p in space.params:
        value = p.suggest(trial)
        if p.divides is not None:
            total = settings.get(p.divides, current_value(cfg, p.divides))
            value = p.fit_divisor(value, int(total))
        settings[p.name] = value
    return settings


def config_diff(cfg: RunConfig, reference: RunConfig) -> dict[str, Any]:
    """The config file that turns `reference` into `cfg`: model, data.dataset, and every data, train
    and model setting that differs (train.runs_dir left out: where runs go is the caller's choice)."""
    from athwe.models import resolved_model_args

    out: dict[str, Any] = {"model": cfg.model, "data": {"dataset": cfg.data.dataset}, "train": {}, "model_args": {}}
    for section in ("data", "train"):
        mine, ref = getattr(cfg, section), getattr(reference, section)
        for key in typing.get_type_hints(type(mine)):
            if getattr(mine, key) != getattr(ref, key) and f"{section}.{key}" != "train.runs_dir":
                out[section][key] = getattr(mine, key)
    mine_m = resolved_model_args(cfg.model, cfg.model_args)
    ref_m = resolved_model_args(cfg.model, reference.model_args)
    out["model_args"] = {k: v for k, v in mine_m.items() if v != ref_m.get(k)}
    return {k: v for k, v in out.items() if v != {}}


# -- the study folder -----------------------------------------------------------------------------------
@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Hold study.lock (flock, released by the system when the process ends, kill -9 included)."""
    import fcntl

    f = open(folder / LOCK, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()
            raise AthweError(f"{folder}: another process{f' (pid {pid})' if pid else ''} is running this study; "
                             f"wait for it to end or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _storage(folder: Path) -> optuna.storages.RDBStorage:
    import optuna

    return optuna.storages.RDBStorage(f"sqlite:///{(folder / DB).resolve()}")


def _sampler(seed: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """TPE seeded with `seed` plus the number of trials already in the study, so that a resumed study
    does not repeat the draws its first session made."""
    import optuna

    return optuna.samplers.TPESampler(seed=(seed + trials_so_far) % 2**32, n_startup_trials=SAMPLER_STARTUP_TRIALS)


def default_pruner() -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)


def trial_dir(folder: Path, number: int) -> Path:
    return folder / TRIALS / f"trial-{number:04d}"


def _check_numbers(trials: int, timeout: float | None, epochs_cap: int | None, seed: int) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= 10**6:
        raise ConfigError(f"--trials must be a whole number from 1 to 1,000,000, got {trials}")
    if timeout is not None and not 0 < timeout < math.inf:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}")
    if epochs_cap is not None and (isinstance(epochs_cap, bool) or not isinstance(epochs_cap, int) or epochs_cap < 1):
        raise ConfigError(f"--epochs-cap must be a whole number >= 1, got {epochs_cap}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"--sampler-seed must be a whole number from 0 to 2**32 - 1, got {seed}")


@dataclass
class StudySettings:
    """What a study is, kept in its study.db: a resumed study must be given the same."""

    model: str
    dataset: str
    overrides: list[str]
    flags: dict[str, Any]
    epochs_cap: int | None
    seed: int
    space: dict[str, Any]  # Space.to_dict(), image choices already left out where there are no images
    space_file: str
    base: dict[str, Any]  # the resolved config every trial starts from (runs.saved_config)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SETTINGS_VERSION, **self.__dict__}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> StudySettings:
        if not isinstance(d, dict) or d.get("version") != SETTINGS_VERSION:
            raise AthweError(f"{where}: holds no athwe study settings (the process that created it stopped "
                             f"before it was set up); delete the folder and start the study again")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def _compare(saved: StudySettings, given: dict[str, Any], folder: Path) -> None:
    """A resumed study takes its settings from study.db: what the call gives must match them."""
    for key, value in given.items():
        have = getattr(saved, key)
        if key == "flags":
            diff = sorted(k for k, v in value.items() if v is not None and have.get(k) != v)
            if diff:
                raise ConfigError(f"--resume: {diff[0]} {value[diff[0]]!r} differs from the study's "
                                  f"{have.get(diff[0])!r} ({folder / DB})")
        elif value not in (None, []) and value != have:
            raise ConfigError(f"--resume: {key} {value!r} differs from the study's {have!r} ({folder / DB})")


# -- running a study ------------------------------------------------------------------------------------
class StudySession:
    """One session of a study (one process, from start or --resume to its end): the Optuna study, its
    settings, the objective and the outputs."""

    def __init__(self, folder: Path, study: optuna.Study, settings: StudySettings, printer: Printer, progress: bool):
        self.folder, self.study, self.settings = folder, study, settings
        self.print, self.progress = printer, progress
        self.space = parse_space(settings.space, str(folder / DB), settings.model)
        self.base = config_from_dict(settings.base, f"{folder / DB} base config")
        self.metric = self.base.train.valid_metric
        self.failures = 0
        self.last_error = ""
        self.tb: Any = None

    def indented(self, text: str) -> None:
        """The trainer's lines, indented under the study's own."""
        self.print("\n".join(f"  {line}" for line in text.splitlines()))

    def config(self, settings: dict[str, Any], number: int | None = None) -> RunConfig:
        """A trial's run config: the base config with the trial's settings; with `number`, its run
        folder's runs_dir and the study's epoch cap."""
        cfg = apply_settings(self.base, settings)
        if number is not None:
            cfg.train.runs_dir = str(self.folder / TRIALS)
            if self.settings.epochs_cap is not None:
                cfg.train.epochs = min(cfg.train.epochs, self.settings.epochs_cap)
        return cfg

    def objective(self, trial: optuna.Trial) -> float:
        """Train one trial's config into its run folder; the best validation value of train.valid_metric.
        Each epoch's value goes to the pruner, which may stop the run (the trial is then PRUNED)."""
        import optuna

        from athwe.training.trainer import StopTraining, train

        run = trial_dir(self.folder, trial.number)
        trial.set_user_attr("run", run.relative_to(self.folder).as_posix())
        metric = self.metric

        def on_epoch(epoch: int, record: dict[str, Any]) -> None:
            trial.report(record[f"valid_{metric}"], epoch)
            if trial.should_prune():
                raise StopTraining(f"pruned: valid {metric} {record[f'valid_{metric}']:.4f} at epoch {epoch} "
                                   f"is below the earlier trials'")

        try:
            settings = sample(self.space, trial, self.base)
            trial.set_user_attr("settings", settings)
            cfg = self.config(settings, trial.number)
            _, res = train(cfg, run_dir=run, printer=self.indented, progress=self.progress, on_epoch=on_epoch)
        except AthweError as e:
            trial.set_user_attr("error", str(e))
            raise
        value = float(res["valid"][metric])
        trial.set_user_attr("epochs", res["epochs_run"])
        trial.set_user_attr("best_epoch", res["best_epoch"])
        trial.set_user_attr("best_valid", value)
        if res["status"] == "pruned":
            trial.set_user_attr("note", res["stopped"])
            raise optuna.TrialPruned(res["stopped"])
        return value

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Print the trial's line, stop after MAX_FAILURES_IN_A_ROW failures, rewrite the outputs."""
        from optuna.trial import TrialState

        attrs = trial.user_attrs
        if trial.state == TrialState.FAIL:
            self.failures += 1
            self.last_error = attrs.get("error", "an unexpected error")
            self.print(f"trial {trial.number} failed: {self.last_error}")
            if self.failures >= MAX_FAILURES_IN_A_ROW:
                study.stop()
        else:
            self.failures = 0
            what = "pruned" if trial.state == TrialState.PRUNED else "finished"
            best = _best(study)
            tail = f"; best {best.value:.4f} (trial {best.number})" if best is not None else ""
            self.print(f"trial {trial.number} {what}: valid {self.metric} {attrs.get('best_valid', 0.0):.4f} "
                       f"({attrs.get('epochs', '?')} epochs, {_seconds(trial):.0f}s){tail}")
        self.write_outputs()

    def write_outputs(self) -> None:
        write_outputs(self.folder, self.study, self)
        self.log_hparams()

    def log_hparams(self) -> None:
        """Each finished (complete or pruned) trial's settings and objective, once, under tensorboard/."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            name = f"trial-{t.number:04d}"
            if (self.folder / TENSORBOARD / name).exists() or "best_valid" not in t.user_attrs:
                continue
            if self.tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.folder / TENSORBOARD))
            hparams = {k: (json.dumps(v) if isinstance(v, list) else v)
                       for k, v in t.user_attrs.get("settings", {}).items()}
            hparams.update(state=t.state.name.lower(), epochs=t.user_attrs.get("epochs", 0))
            self.tb.add_hparams(hparams, {f"hparams/valid_{self.metric}": t.user_attrs["best_valid"]}, run_name=name)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _seconds(trial: optuna.trial.FrozenTrial) -> float:
    return trial.duration.total_seconds() if trial.duration is not None else 0.0


def _finished(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _check_new_folder(folder: Path) -> None:
    """A new study goes into a missing or empty folder."""
    if folder.exists() and not folder.is_dir():
        raise AthweError(f"{folder}: --study is a file, not a folder")
    if folder.is_dir() and any(p.name != LOCK for p in folder.iterdir()):
        what = "a study" if (folder / DB).exists() else "files"
        raise AthweError(f"{folder}: already holds {what}; continue a study with --resume, or pass a new or "
                         f"empty --study folder")


def _fail_abandoned(folder: Path, study: optuna.Study, printer: Printer) -> None:
    """Trials left RUNNING by a process that died (the lock proves none runs now) become FAIL: they are
    not counted and not retried, and their run folders stay as they were left."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        printer(f"trial {t.number} was cut off when its process stopped: marked failed ({trial_dir(folder, t.number)} "
                f"is left as it was)")


def run_study(model: str | None, dataset: str | None = None, space_file: str | Path | None = None, trials: int = 20,
              timeout: float | None = None, study_dir: str | Path | None = None, resume: bool = False,
              overrides: list[str] | None = None, flags: dict[str, Any] | None = None,
              epochs_cap: int | None = None, seed: int = 0, printer: Printer = print, progress: bool = False,
              pruner: Any = None) -> dict[str, Any]:
    """Run (or, with `resume`, continue) a study until `trials` trials have finished (COMPLETE or
    PRUNED, earlier sessions included) or `timeout` seconds have passed (a trial under way then
    finishes). Returns a summary: folder, counts, the best trial's number, value, settings and run.
    `pruner` replaces the default MedianPruner (tests; an Optuna pruner)."""
    import optuna

    _check_numbers(trials, timeout, epochs_cap, seed)
    if resume:
        if study_dir is None:
            raise ConfigError("--resume needs --study DIR, the folder of the study to continue")
        folder = Path(study_dir)
        if not (folder / DB).is_file():
            raise AthweError(f"{folder}: no study to resume (no {DB}); start one without --resume")
    else:
        if not model:
            raise ConfigError("--model is required to start a study")
        settings = _new_settings(model, dataset, space_file, overrides or [], flags or {}, epochs_cap, seed, printer)
        folder = Path(study_dir) if study_dir else _default_folder(settings)
        _check_new_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line of ours instead
    session: StudySession | None = None
    try:
        with study_lock(folder):
            if resume:
                study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(folder),
                                          pruner=pruner or default_pruner())
                settings = StudySettings.from_dict(study.user_attrs.get("athwe"), str(folder / DB))
                _check_resume(folder, settings, model, dataset, space_file, overrides, flags, epochs_cap)
                _fail_abandoned(folder, study, printer)
                study.sampler = _sampler(settings.seed, len(study.trials))
            else:
                _check_new_folder(folder)  # again, under the lock: another process may have started one
                study = optuna.create_study(storage=_storage(folder), study_name=STUDY_NAME, direction="maximize",
                                            sampler=_sampler(settings.seed, 0), pruner=pruner or default_pruner())
                study.set_user_attr("athwe", settings.to_dict())
            session = StudySession(folder, study, settings, printer, progress)
            done = _finished(study)
            printer(f"study {folder}: {settings.model} on {settings.dataset}, {done} of {trials} trials finished")
            if done < trials:
                states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                try:
                    study.optimize(session.objective, timeout=timeout, catch=(AthweError,),
                                   callbacks=[optuna.study.MaxTrialsCallback(trials, states=states),
                                              session.after_trial])
                except KeyboardInterrupt:
                    session.write_outputs()  # Optuna marked the trial under way failed
                    raise
            session.write_outputs()
            if session.failures >= MAX_FAILURES_IN_A_ROW:
                raise AthweError(f"{MAX_FAILURES_IN_A_ROW} trials in a row failed, the last with: "
                                 f"{session.last_error}; see {folder / TRIALS_MD}, then continue with --resume")
            return summary(folder, study)
    finally:
        if session is not None:
            session.close()
        optuna.logging.set_verbosity(verbosity)


def _check_resume(folder: Path, settings: StudySettings, model: str | None, dataset: str | None,
                  space_file: str | Path | None, overrides: list[str] | None, flags: dict[str, Any] | None,
                  epochs_cap: int | None) -> None:
    """What a --resume call gives (anything left out is taken from study.db) must match the study."""
    _compare(settings, {"model": model, "dataset": dataset, "overrides": overrides, "flags": flags or {},
                        "epochs_cap": epochs_cap}, folder)
    if space_file is not None:
        given = load_space(settings.model, space_file).to_dict()
        if with_saved_choices(given, settings.space) != settings.space:
            raise ConfigError(f"--resume: --space {space_file} differs from the study's space ({folder / DB})")


def with_saved_choices(given: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """`given` (a space file read again on resume) with the choices the study left out for missing
    features left out too, so that it compares equal to the saved space it was made from."""
    out = copy.deepcopy(given)
    for name, spec in out.get("params", {}).items():
        kept = saved.get("params", {}).get(name, {}).get("choices")
        if "choices" in spec and kept is not None and all(c in spec["choices"] for c in kept):
            spec["choices"] = kept
    return out


def _default_folder(settings: StudySettings) -> Path:
    return Path("studies") / f"{settings.model}-{settings.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _new_settings(model: str, dataset: str | None, space_file: str | Path | None, overrides: list[str],
                  flags: dict[str, Any], epochs_cap: int | None, seed: int, printer: Printer) -> StudySettings:
    """Everything a new study needs, checked before any file is written: the config, the space (its
    ranges on this config, image choices only with image features) and the dataset."""
    from athwe import runs
    from athwe.models import check_run_config

    space = load_space(model, space_file)
    base = resolve_config(model, dataset, None, overrides, flags)
    check_run_config(base)
    check_space(space, base)
    data, _ = runs.load_data(base)
    features = runs.load_model_features(base, data, printer, progress=False)
    space = with_available_features(space, features)
    return StudySettings(model=base.model, dataset=base.data.dataset, overrides=list(overrides), flags=dict(flags),
                         epochs_cap=epochs_cap, seed=seed, space=space.to_dict(), space_file=space.source,
                         base=runs.saved_config(base))


def summary(folder: Path, study: optuna.Study) -> dict[str, Any]:
    from optuna.trial import TrialState

    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    best = _best(study)
    out: dict[str, Any] = {"study": str(folder), **counts, "best_trial": None}
    if best is not None:
        out.update(best_trial=best.number, best_value=best.value, best_settings=best.user_attrs.get("settings"),
                   best_run=str(folder / best.user_attrs.get("run", "")), best_yaml=str(folder / BEST_YAML))
    return out


# -- outputs --------------------------------------------------------------------------------------------
def trial_rows(study: optuna.Study, names: list[str]) -> list[dict[str, Any]]:
    """One row per trial: number, state, value (the best validation value it reached; for a pruned
    trial, before it was stopped), epochs, best epoch, seconds, run folder, note, then its settings."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        note = a.get("error") or a.get("note") or ""
        if t.state == TrialState.FAIL and not note:
            note = "its process stopped before the trial finished"
        value = a.get("best_valid")
        row = {"number": t.number, "state": {"COMPLETE": "complete"}.get(t.state.name, t.state.name.lower()),
               "value": round(value, 6) if value is not None else "", "epochs": a.get("epochs", ""),
               "best_epoch": a.get("best_epoch", ""), "seconds": round(_seconds(t), 1) if t.duration else "",
               "run": a.get("run", ""), "note": note}
        settings = a.get("settings", {})
        row.update({n: json.dumps(settings[n]) if isinstance(settings.get(n), list) else settings.get(n, "")
                    for n in names})
        rows.append(row)
    return rows


def write_outputs(folder: Path, study: optuna.Study, session: StudySession) -> None:
    """best.yaml, trials.md, trials.csv and progress.png, each replaced atomically."""
    rows = trial_rows(study, session.space.names())
    write_best_yaml(folder, study, session)
    _write_csv(folder / TRIALS_CSV, rows)
    _write_md(folder / TRIALS_MD, rows, study, session)
    _write_progress(folder / PROGRESS, rows, session)


def write_best_yaml(folder: Path, study: optuna.Study, session: StudySession) -> None:
    """The best complete trial's settings as a config file for `athwe train --config best.yaml`: what
    differs from the model's and dataset's packaged defaults (the study's overrides and the trial's
    settings), without the study's epoch cap."""
    best = _best(study)
    if best is None:
        return
    s = session.settings
    cfg = session.config(best.user_attrs.get("settings", {}))
    reference = resolve_config(s.model, s.dataset)
    cap = f"; the study capped epochs at {s.epochs_cap}, left out here" if s.epochs_cap is not None else ""
    head = (f"# best trial {best.number} of the study in {folder}: valid {session.metric} {best.value:.4f} "
            f"at epoch {best.user_attrs.get('best_epoch')}{cap}\n"
            f"# its run folder: {folder / best.user_attrs.get('run', '')}\n"
            f"# train it again: athwe train --config {folder / BEST_YAML}\n")
    _write_text(folder / BEST_YAML, head + yaml.safe_dump(config_diff(cfg, reference), sort_keys=False))


def _write_text(path: Path, text: str) -> None:
    from athwe.utils import atomic_write_text

    atomic_write_text(path, text)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, buf.getvalue())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _write_md(path: Path, rows: list[dict[str, Any]], study: optuna.Study, session: StudySession) -> None:
    s = session.settings
    best = _best(study)
    counts = summary(path.parent, study)
    lines = [f"# Study: {s.model} on {s.dataset}", "",
             f"Objective: best validation {session.metric} of each trial (maximised). "
             f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed.",
             f"Best: trial {best.number}, {best.value:.4f} ({BEST_YAML})." if best is not None else "Best: none yet.",
             ""]
    if rows:
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "---|" * len(rows[0]))
        lines += ["| " + " | ".join(f"{v:.4f}" if k == "value" and v != "" else _cell(v) for k, v in r.items())
                  + " |" for r in rows]
    _write_text(path, "\n".join(lines) + "\n")


def _write_progress(path: Path, rows: list[dict[str, Any]], session: StudySession) -> None:
    """The objective of every complete (dots) and pruned (crosses, value before pruning) trial, and the
    best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "complete"]
    cut = [r for r in rows if r["state"] == "pruned" and r["value"] != ""]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], label="complete", zorder=3)
    ax.scatter([r["number"] for r in cut], [r["value"] for r in cut], marker="x", color="grey", label="pruned")
    best, xs, ys = -math.inf, [], []
    for r in done:
        best = max(best, r["value"])
        xs.append(r["number"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial"), ax.set_ylabel(f"valid {session.metric}")
    ax.set_title(f"{session.settings.model} on {session.settings.dataset}")
    if rows:
        ax.legend(loc="lower right")
    fig.tight_layout()
    from athwe.utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
