"""Run folders: everything that reads or writes one.

A run folder ``runs/<model>-<dataset>-<time>/`` holds
- ``config.yaml``: the resolved config, every model setting included (defaults too);
- ``item_map.json``: internal item id -> token, with the item-map fingerprint;
- ``metrics.jsonl``: one record per finished epoch;
- ``last.pt`` (the whole training state, for an exact resume) and ``best.pt`` (the model's state
  dict at the best validation epoch); both load with ``torch.load(weights_only=True)``;
- ``results.json`` and ``curves.png`` once training ends; ``index.faiss`` / ``index.json`` from
  athwe.retrieval.
The trainer writes through this module; evaluation, retrieval and the CLI read through it.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from athwe.config import RunConfig, config_from_dict, history_mode, load_yaml
from athwe.dataset.sequences import SequenceData, dataset_dir, load_sequences
from athwe.dataset.split import Split, build_split
from athwe.errors import AthweError, ConfigError, DataError, brief
from athwe.evaluation.metrics import evaluate
from athwe.feature_extraction.store import MANIFEST_FILE, features_dir, load_features
from athwe.models import SequentialRecommender, check_run_config, create_model, get_entry, resolved_model_args
from athwe.utils import (atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, read_json,
                         resolve_device)

Printer = Callable[[str], None]

CONFIG = "config.yaml"
ITEM_MAP = "item_map.json"
METRICS = "metrics.jsonl"
LAST = "last.pt"
BEST = "best.pt"
RESULTS = "results.json"
CURVES = "curves.png"


# -- data a run is trained on ----------------------------------------------------------------------
def load_data(cfg: RunConfig) -> tuple[SequenceData, Split]:
    """Read (or generate, for the demo) the dataset and split it as the config says."""
    if cfg.data.dataset == "demo":
        from athwe.dataset.demo import ensure_demo

        ensure_demo(cfg.data.data_dir)
    data = load_sequences(cfg.data.data_dir, cfg.data.dataset, kcore=cfg.data.kcore)
    split = build_split(data, cfg.data.max_seq_length, cfg.data.preset)
    if len(split.train) == 0 or len(split.test) == 0:
        raise DataError(f"{cfg.data.data_dir}/{cfg.data.dataset}: no user has the 3 interactions "
                        f"a leave-one-out split needs")
    return data, split


def load_model_features(cfg: RunConfig, data: SequenceData, printer: Printer = print, progress: bool = True) -> Any:
    """The dataset's item features (a FeatureSet) for models registered with needs_features, else
    None. The demo's are extracted on first use (offline); other datasets need `athwe extract`."""
    if not get_entry(cfg.model).needs_features:
        return None
    folder = dataset_dir(cfg.data.data_dir, cfg.data.dataset)
    if cfg.data.dataset == "demo" and not (features_dir(folder) / MANIFEST_FILE).is_file():
        from athwe.feature_extraction import extract_features
        from athwe.feature_extraction.extract import summarize

        printer(f"{cfg.model} needs item features: extracting the demo's into {features_dir(folder)} (once)")
        manifest = extract_features("demo", cfg.data.data_dir, kcore=cfg.data.kcore, device=cfg.train.device,
                                    progress=progress, log=printer)
        for line in summarize(manifest):
            printer(line)
    return load_features(folder, data.item_tokens)


# -- writing -----------------------------------------------------------------------------------------
def new_run_dir(cfg: RunConfig) -> Path:
    """A fresh folder runs_dir/<model>-<dataset>-<time>[-i]."""
    root = Path(cfg.train.runs_dir)
    base = f"{cfg.model}-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, i = root / base, 1
    while path.exists():
        i += 1
        path = root / f"{base}-{i}"
    path.mkdir(parents=True)
    return path


def saved_config(cfg: RunConfig) -> dict[str, Any]:
    """What config.yaml holds: the resolved config with every model setting, defaults included, so a
    default changed in a later release does not change what an existing run means."""
    saved = cfg.to_dict()
    saved["model_args"] = resolved_model_args(cfg.model, cfg.model_args)
    return saved


def save_run_files(run_dir: Path, cfg: RunConfig, data: SequenceData) -> None:
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(saved_config(cfg), sort_keys=False))
    atomic_write_json(run_dir / ITEM_MAP, data.item_map())


def save_best(run_dir: Path, model: nn.Module) -> None:
    atomic_torch_save(model.state_dict(), run_dir / BEST)


def save_last(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(state, run_dir / LAST)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_until(run_dir: Path, epoch: int) -> None:
    """Drop epoch records after `epoch` (written after the checkpoint a run resumes from) and a line
    cut short by a kill."""
    path = run_dir / METRICS
    if path.is_file():
        rows = [r for r in read_metrics(path) if r["epoch"] <= epoch]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_json(run_dir / RESULTS, results)
    write_curves(run_dir)


def write_curves(run_dir: Path) -> None:
    """Training loss and validation metrics per epoch, as curves.png."""
    path = run_dir / METRICS
    rows = read_metrics(path) if path.is_file() else []
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [r["train_loss"] for r in rows], marker=".")
    a.set_xlabel("epoch"), a.set_ylabel("train loss"), a.set_title("training loss")
    for key in ("valid_HR@10", "valid_NDCG@10", "valid_NDCG@20"):
        b.plot(ep, [r[key] for r in rows], marker=".", label=key[6:])
    b.set_xlabel("epoch"), b.set_title("validation"), b.legend()
    fig.tight_layout()
    with atomic_path(run_dir / CURVES) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# -- reading -----------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a metrics.jsonl, skipping blank lines and a line cut short by a kill;
    AthweError for a file that is damaged otherwise (records are ASCII JSON, one per line)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise AthweError(f"{path}: cannot be read ({e.strerror or e})") from None
    rows = []
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            if i == len(lines):  # the last line, cut in the middle of a character
                continue
            raise AthweError(f"{path}: line {i} is not text, the file is damaged; delete that line (the run's "
                             f"checkpoints do not depend on it)") from None
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            rows.append(record)
    return rows


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with a one-line error for a damaged or foreign file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise AthweError(f"{path}: not a readable checkpoint ({brief(e)}); it may be truncated") from None


def load_weights(model: nn.Module, state: Any, path: Path) -> None:
    """load_state_dict with a one-line error when the file's weights belong to another model."""
    if not isinstance(state, dict):
        raise AthweError(f"{path}: holds a {type(state).__name__}, not a model state dict")
    try:
        model.load_state_dict(state)  # the model's own load hooks run first (ATHWE's feature check)
    except AthweError as e:
        raise AthweError(f"{path}: {e}") from None
    except (RuntimeError, TypeError) as e:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and isinstance(state[k], torch.Tensor)
                  and state[k].shape != own[k].shape]
        problems = [f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        detail = ", ".join(problems) or str(e).strip().splitlines()[-1]
        raise AthweError(f"{path}: weights do not fit the run's {type(model).__name__} model: {detail}") from None


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding NaN or an infinity (a diverged model), else None."""
    return next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """A run's config.yaml, checked as a fresh config is."""
    run = Path(run_dir)
    path = run / CONFIG
    if not path.is_file():
        raise AthweError(f"{run}: not a run folder (no {CONFIG})")
    saved = load_yaml(path)
    if not isinstance(saved.get("model"), str):
        raise AthweError(f"{path}: saved run config names no model")
    cfg = config_from_dict(saved, str(path))
    check_run_config(cfg, str(path))
    return cfg


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """One record per run folder under `runs_dir` (oldest first): name, model, dataset, status
    ("finished"; "unfinished": training now, or stopped with a last.pt to resume from; "empty"
    before its first epoch; "damaged" when its results.json or metrics.jsonl cannot be read),
    epochs run and allowed, the best validation metric and its epoch, test NDCG@10 when finished,
    and the processes / threads of its last epoch. Folders without a readable config.yaml are left out."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise AthweError(f"{root}: no runs folder")
    rows = []
    for run in sorted((p for p in root.iterdir() if (p / CONFIG).is_file()),
                      key=lambda p: ((p / CONFIG).stat().st_mtime, p.name)):
        try:
            cfg = load_run_config(run)
        except (AthweError, ConfigError):
            continue
        metric = cfg.train.valid_metric
        try:
            epochs = read_metrics(run / METRICS) if (run / METRICS).is_file() else []
        except AthweError:
            epochs, damaged = [], True
        else:
            damaged = False
        best = max(epochs, key=lambda r: (r.get(f"valid_{metric}", -math.inf), -r["epoch"]), default=None)
        row: dict[str, Any] = {"run": str(run), "model": cfg.model, "dataset": cfg.data.dataset,
                               "epochs": len(epochs), "max_epochs": cfg.train.epochs, "valid_metric": metric,
                               "best_valid": best.get(f"valid_{metric}") if best else None,
                               "best_epoch": best["epoch"] if best else None, "test_NDCG@10": None,
                               "processes": epochs[-1].get("processes", 1) if epochs else None,
                               "threads": epochs[-1].get("num_threads") if epochs else None}
        if (run / RESULTS).is_file():
            try:
                res = json.loads((run / RESULTS).read_text(encoding="utf-8"))
                row.update(status="finished", best_epoch=res["best_epoch"], epochs=res["epochs_run"],
                           **{"test_NDCG@10": res["test"]["NDCG@10"]})
            except (ValueError, KeyError, TypeError):
                row["status"] = "damaged"
        else:
            row["status"] = "unfinished" if (run / LAST).is_file() else "empty"
        if damaged:
            row["status"] = "damaged"
        rows.append(row)
    return rows


def latest_run(runs_dir: str | Path) -> Path:
    """The most recently finished run folder under `runs_dir`."""
    runs = sorted(Path(runs_dir).glob(f"*/{RESULTS}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise AthweError(f"{runs_dir}: no finished run found (train one with `athwe train`, or pass --run)")
    return runs[-1].parent


def load_run_model(run_dir: str | Path) -> tuple[SequentialRecommender, SequenceData, RunConfig]:
    """A finished run's model (best checkpoint, eval mode) with its data; checks the item map."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    best = run / BEST
    if not best.is_file():
        raise AthweError(f"{best}: run has no best checkpoint yet")
    if cfg.data.dataset == "demo":
        from athwe.dataset.demo import ensure_demo

        ensure_demo(cfg.data.data_dir)
    data = load_sequences(cfg.data.data_dir, cfg.data.dataset, kcore=cfg.data.kcore)
    map_path = run / ITEM_MAP
    if not map_path.is_file():
        raise AthweError(f"{run}: not a complete run folder (no {ITEM_MAP})")
    item_map = read_json(map_path)
    saved = item_map.get("fingerprint") if isinstance(item_map, dict) else None
    if not isinstance(saved, str):
        raise AthweError(f"{map_path}: has no item-map fingerprint")
    if saved != data.item_fingerprint:
        raise AthweError(f"{run}: item map {saved} does not match dataset {cfg.data.dataset} "
                         f"({data.item_fingerprint})")
    try:
        device = resolve_device(cfg.train.device)
    except ConfigError:  # trained on a GPU this machine lacks: evaluate where it can
        device = resolve_device("auto")
    features = load_model_features(cfg, data, progress=False)
    model = create_model(cfg.model, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss,
                         features).to(device)
    load_weights(model, load_checkpoint(best, device), best)
    broken = nonfinite_parameter(model)
    if broken is not None:
        raise AthweError(f"{best}: {broken} holds NaN or infinite values (the run diverged); train it again "
                         f"with a lower train.lr")
    model.eval()
    return model, data, cfg


# -- results -----------------------------------------------------------------------------------------
def results_header(cfg: RunConfig) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "dataset": cfg.data.dataset,
        "preset": cfg.data.preset,
        "split": "chronological leave-one-out (valid s[-2], test s[-1])",
        "history": history_mode(cfg),
        "padding": "excluded",
        "ranking": "full (all items)",
        "tie_rule": "rank = items scored strictly higher",
        "loss": cfg.train.loss,
        "max_seq_length": cfg.data.max_seq_length,
        "precision": cfg.train.precision,
    }


def format_results(header: dict[str, Any], metrics: dict[str, float], ks: tuple[int, ...] = (5, 10, 20, 50)) -> str:
    keys = ("model", "dataset", "preset", "history", "loss", "max_seq_length")
    head = ", ".join(f"{k}={v}" for k, v in header.items() if k in keys)
    lines = [f"[{head}; ties: strictly higher; padding excluded]",
             f"{'':8s}" + "".join(f"{'@' + str(k):>9s}" for k in ks)]
    for m in ("HR", "NDCG", "MRR"):
        lines.append(f"{m:8s}" + "".join(f"{metrics[f'{m}@{k}']:9.4f}" for k in ks))
    if metrics.get("nonfinite_rows"):
        lines.append(f"{int(metrics['nonfinite_rows']):,} rows had NaN or infinite scores and count as misses")
    return "\n".join(lines)


def evaluate_run(run_dir: str | Path, split_name: str = "test", history: str | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's best checkpoint."""
    return evaluate_run_rows(run_dir, split_name, history, batch_size)[0]


def evaluate_run_rows(run_dir: str | Path, split_name: str = "test", history: str | None = None,
                      batch_size: int | None = None) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """evaluate_run's result, plus each evaluated row's user index and target rank."""
    if batch_size is not None and batch_size < 1:
        raise AthweError(f"--batch-size must be at least 1, got {batch_size}")
    model, data, cfg = load_run_model(run_dir)
    if history:
        cfg.data.history = history
    split = build_split(data, cfg.data.max_seq_length, cfg.data.preset)
    samples = split.test if split_name == "test" else split.valid
    metrics, ranks = evaluate(model.scores, samples, history_mode(cfg), batch_size or cfg.train.eval_batch_size,
                              next(model.parameters()).device, trim=model.supports_trimming)
    return {"header": results_header(cfg), split_name: metrics}, samples.user.clone(), ranks
