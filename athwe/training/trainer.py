"""The trainer: Adam, CE or BCE, early stopping, best-checkpoint test, exact resume.

A run folder ``runs/<id>/`` holds config.yaml (resolved: every model setting, defaults included),
item_map.json, metrics.jsonl (one line per epoch), last.pt and best.pt (plain state dicts;
``torch.load(weights_only=True)`` works), results.json and curves.png. Under torchrun several
processes train one run data-parallel (athwe.training.distributed).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
import yaml
from tqdm.auto import tqdm

from athwe.config import RunConfig, config_from_dict, history_mode, load_yaml, validate
from athwe.dataset.sequences import SequenceData, load_sequences
from athwe.dataset.split import Batch, SampleSet, Split, build_split
from athwe.errors import AthweError, ConfigError, DataError, brief
from athwe.evaluation.metrics import KS, evaluate, metrics_from_ranks
from athwe.models import create_model, resolved_model_args
from athwe.models.base import SequentialRecommender
from athwe.training import distributed
from athwe.utils import (atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, busy_cpus_elsewhere,
                         keep_freed_memory, oversubscription_note, read_json, resolve_device, seed_everything)

Printer = Callable[[str], None]


def load_data(cfg: RunConfig) -> tuple[SequenceData, Split]:
    """Read (or generate, for the demo) the dataset and split it as the config says."""
    if cfg.data.dataset == "demo":
        from athwe.dataset.demo import ensure_demo

        ensure_demo(cfg.data.data_dir)
    data = load_sequences(cfg.data.data_dir, cfg.data.dataset, kcore=cfg.data.kcore)
    split = build_split(data, cfg.data.max_seq_length, cfg.data.preset)
    if len(split.train) == 0 or len(split.test) == 0:
        raise DataError(f"{cfg.data.data_dir}/{cfg.data.dataset}: no user has the 3 interactions a leave-one-out split needs")
    return data, split


def load_model_features(cfg: RunConfig, data: SequenceData, printer: Printer = print, progress: bool = True) -> Any:
    """The dataset's item features (a feature-store FeatureSet) for models registered with
    needs_features, else None. The demo's are extracted on first use (offline); any other dataset
    must have been extracted with `athwe extract`."""
    from athwe.models import get_entry

    if not get_entry(cfg.model).needs_features:
        return None
    from athwe.dataset.sequences import dataset_dir
    from athwe.feature_extraction.store import MANIFEST_FILE, features_dir, load_features

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


def autocast_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """A factory of the context a training step runs in: bfloat16 autocast for precision bf16 (no
    loss scaling is needed: bfloat16 has float32's exponent range), a no-op for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


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
    head = ", ".join(f"{k}={v}" for k, v in header.items() if k in ("model", "dataset", "preset", "history", "loss", "max_seq_length"))
    lines = [f"[{head}; ties: strictly higher; padding excluded]", f"{'':8s}" + "".join(f"{'@' + str(k):>9s}" for k in ks)]
    for m in ("HR", "NDCG", "MRR"):
        lines.append(f"{m:8s}" + "".join(f"{metrics[f'{m}@{k}']:9.4f}" for k in ks))
    return "\n".join(lines)


def sample_negatives(batch: Batch, n_items: int, rounds: int = 20) -> torch.Tensor:
    """One random item per row that is neither the target nor in the input (global torch RNG)."""
    neg = torch.randint(1, n_items + 1, (len(batch),))
    for _ in range(rounds):
        bad = (neg == batch.target) | (batch.input_ids == neg.unsqueeze(1)).any(1)
        if not bool(bad.any()):
            break
        neg[bad] = torch.randint(1, n_items + 1, (int(bad.sum()),))
    return neg


def _quiet(line: str) -> None:
    """The printer of a process other than rank 0 under torchrun."""


def _rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of process `rank` > 0 under torchrun (rank 0 keeps the run's seed)."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % 2**63


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


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
    except (RuntimeError, TypeError) as e:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
        problems = [f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        detail = ", ".join(problems) or str(e).strip().splitlines()[-1]
        raise AthweError(f"{path}: weights do not fit the run's {type(model).__name__} model: {detail}") from None


def _new_run_dir(cfg: RunConfig) -> Path:
    root = Path(cfg.train.runs_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{cfg.model}-{cfg.data.dataset}-{stamp}"
    path, i = root / base, 1
    while path.exists():
        i += 1
        path = root / f"{base}-{i}"
    path.mkdir(parents=True)
    return path


class Trainer:
    """Trains one model on one split; every state needed for an exact resume lives in last.pt."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: SequenceData, split: Split,
                 printer: Printer = print, progress: bool = True):
        self.cfg, self.run_dir, self.data, self.split = cfg, run_dir, data, split
        # under torchrun: this process's rank and device (cuda:LOCAL_RANK); rank 0 alone prints and writes
        self.world, self.device = distributed.setup(resolve_device(cfg.train.device))
        self.print = printer if self.world.main else _quiet
        self.progress = progress and self.world.main
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if self.device.type == "cpu":
            note = oversubscription_note(torch.get_num_threads(), busy_cpus_elsewhere(), os.cpu_count())
            if note:
                printer(f"note: {note}")
        if cfg.train.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16 support; "
                              "use train.precision fp32")
        self.autocast = autocast_context(self.device, cfg.train.precision)
        keep_freed_memory()
        features = load_model_features(cfg, data, printer, progress)
        seed_everything(cfg.train.seed)
        self.model: SequentialRecommender = create_model(
            cfg.model, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss, features).to(self.device)
        self.model.prepare(split.train)
        for note in self.model.training_notes(split.train):
            printer(f"note: {note}")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        if self.world.rank > 0:  # the same initial weights everywhere; each process its own dropout draws
            seed_everything(_rank_seed(cfg.train.seed, self.world.rank))
        self.history = history_mode(cfg)
        self.epoch = 0
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.train_samples = 0
        self.build_index = True  # an exact retrieval index is written with the results

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds,
            "train_samples": self.train_samples,
            "rng": _rng_state(),
            "item_fingerprint": self.data.item_fingerprint,
            **({"rng_ranks": distributed.gather(_rng_state())} if self.world.active else {}),
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        if ckpt["item_fingerprint"] != self.data.item_fingerprint:
            raise AthweError(f"{self.run_dir}: checkpoint item map {ckpt['item_fingerprint']} does not match "
                             f"the dataset's {self.data.item_fingerprint}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for k in ("epoch", "best_metric", "best_epoch", "bad_epochs", "train_seconds", "train_samples"):
            setattr(self, k, ckpt[k])
        ranks = ckpt.get("rng_ranks")
        if self.world.active and isinstance(ranks, list) and len(ranks) == self.world.size:
            _set_rng_state(ranks[self.world.rank])
        else:  # one process, or another number of them than the run had: rank 0 goes on from the record
            _set_rng_state(ckpt["rng"])
            if self.world.active:
                before = len(ranks) if isinstance(ranks, list) else 1
                self.print(f"note: the run trained on {before} process(es) so far and goes on with {self.world.size}: "
                           f"processes other than rank 0 draw new random states, so it will not repeat a run "
                           f"kept on {before}")
                if self.world.rank > 0:
                    seed_everything(_rank_seed(self.cfg.train.seed, self.world.rank, self.epoch))

    # -- loop --------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        self.model.train()
        train = self.split.train
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(train), generator=g)
        bs = self.cfg.train.batch_size
        total, steps = 0.0, 0
        bar = tqdm(range(0, len(train), bs), desc=f"epoch {self.epoch + 1}", leave=False,
                   disable=not self.progress or None, unit="batch")
        world = self.world
        for start in bar:
            rows = perm[start:start + bs]
            share = 1.0
            if world.active:  # this process's part of the batch, weighted by its size
                mine = rows[world.rank::world.size]
                share, rows = len(mine) / len(rows), mine
            self.optimizer.zero_grad(set_to_none=True)
            value = 0.0
            if len(rows):
                batch = train.batch(rows)
                if self.cfg.train.loss == "bce":
                    batch.neg = sample_negatives(batch, self.data.n_items)
                with self.autocast():
                    loss = self.model.loss(batch.to(self.device))
                loss.backward()
                value = loss.item()
            if world.active:
                distributed.average_gradients(self.model.parameters(), share)
                value = float(distributed.all_sum(torch.tensor([value * share], dtype=torch.float64))[0])
            self.optimizer.step()
            total += value
            steps += 1
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        return total / max(steps, 1)

    def evaluate(self, samples: SampleSet) -> dict[str, float]:
        self.model.eval()
        shard = (self.world.rank, self.world.size) if self.world.active else None
        metrics, ranks = evaluate(self.model.scores, samples, self.history, self.cfg.train.eval_batch_size, self.device,
                                  trim=self.model.supports_trimming, shard=shard)
        if shard is None:
            return metrics
        return metrics_from_ranks(distributed.all_sum(ranks), KS)  # every process's users: exact metrics

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until early stopping or the epoch limit; `stop_after` ends this call after that many
        epochs (used to test resume), leaving last.pt to continue from."""
        cfg = self.cfg.train
        metric = cfg.valid_metric
        done_now = 0
        while self.epoch < cfg.epochs and self.bad_epochs < cfg.patience:
            t0 = time.perf_counter()
            loss = self.train_epoch()
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            self.train_samples += len(self.split.train)
            self.epoch += 1
            valid = self.evaluate(self.split.valid)
            improved = valid[metric] > self.best_metric
            main = self.world.main
            if improved:
                self.best_metric, self.best_epoch, self.bad_epochs = valid[metric], self.epoch, 0
                if main:
                    atomic_torch_save(self.model.state_dict(), self.run_dir / "best.pt")
            else:
                self.bad_epochs += 1
            record = {"epoch": self.epoch, "train_loss": round(loss, 6), "train_seconds": round(dt, 3),
                      "samples_per_s": round(len(self.split.train) / dt, 1), "num_threads": torch.get_num_threads(),
                      **({"processes": self.world.size} if self.world.active else {}),
                      **{f"valid_{k}": round(v, 6) for k, v in valid.items()}}
            state = self.state()  # every process takes part (under torchrun it gathers their RNG states)
            if main:
                with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                atomic_torch_save(state, self.run_dir / "last.pt")
            if self.world.active:
                distributed.barrier()  # the checkpoints are written before any process reads them
            self.print(f"epoch {self.epoch:3d}  loss {loss:.4f}  valid {metric} {valid[metric]:.4f}"
                       f"{'  *' if improved else ''}  ({dt:.1f}s, {record['samples_per_s']:.0f} samples/s)")
            done_now += 1
            if stop_after is not None and done_now >= stop_after and self.epoch < cfg.epochs:
                return {}
        return self.finish()

    def finish(self) -> dict[str, Any]:
        best = self.run_dir / "best.pt"
        if best.is_file():
            load_weights(self.model, load_checkpoint(best, self.device), best)
        valid = self.evaluate(self.split.valid)
        test = self.evaluate(self.split.test)
        results = {
            "header": results_header(self.cfg),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epoch,
            "train_seconds": round(self.train_seconds, 2),
            "train_samples_per_s": round(self.train_samples / self.train_seconds, 1) if self.train_seconds else None,
            "valid": valid,
            "test": test,
            "data": self.data.summary(),
            "item_fingerprint": self.data.item_fingerprint,
        }
        if not self.world.main:
            return results
        atomic_write_json(self.run_dir / "results.json", results)
        write_curves(self.run_dir)
        self.print(format_results(results["header"], test))
        if self.build_index:
            from athwe.retrieval import build_run_index

            meta = build_run_index(self.run_dir)
            self.print(f"index: {meta['kind']} over {meta['n_items']:,} items in {self.run_dir / 'index.faiss'}")
        return results


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a metrics.jsonl, skipping blank lines and a line cut short by a kill."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            rows.append(record)
    return rows


def write_curves(run_dir: Path) -> None:
    """Training loss and validation metrics per epoch, as curves.png."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    rows = read_metrics(path)
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
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def saved_config(cfg: RunConfig) -> dict[str, Any]:
    """What a run folder's config.yaml holds: the resolved config with every model setting,
    defaults included (`resolved_model_args`)."""
    saved = cfg.to_dict()
    saved["model_args"] = resolved_model_args(cfg.model, cfg.model_args)
    return saved


def save_run_files(run_dir: Path, cfg: RunConfig, data: SequenceData) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(saved_config(cfg), sort_keys=False))
    atomic_write_json(run_dir / "item_map.json", data.item_map())


def train(cfg: RunConfig, run_dir: str | Path | None = None, printer: Printer = print, progress: bool = True,
          stop_after: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Train a model from a resolved config into a new run folder; returns (run_dir, results).
    Under torchrun every process calls it; rank 0 creates the folder and prints."""
    validate(cfg)  # a RunConfig built in Python gets the checks resolve_config applies
    world, _ = distributed.setup(resolve_device(cfg.train.device))
    if not world.main:
        printer, progress = _quiet, False
    if run_dir is not None and world.main:
        target = Path(run_dir)
        if target.exists() and not target.is_dir():
            raise AthweError(f"{target}: --run-dir is a file, not a folder")
        if target.is_dir() and any(target.iterdir()):
            what = "a run" if (target / "config.yaml").is_file() else "files"
            raise AthweError(f"{target}: already holds {what}; continue a run with `athwe train --resume {target}`, "
                             f"or pass a new or empty --run-dir")
    if not world.main:  # rank 0 first prepares what is missing (the demo, its features) and the run folder
        run = Path(distributed.broadcast(None))
    data, split = load_data(cfg)
    printer(f"{cfg.data.dataset}: {data.n_users} users, {data.n_items} items, {data.n_interactions} interactions; "
            f"{len(split.train)} training samples ({cfg.data.preset} preset, N={cfg.data.max_seq_length})")
    created = False
    if world.main:
        run = Path(run_dir) if run_dir else _new_run_dir(cfg)
        created = not run.exists() or not any(run.iterdir())
        run.mkdir(parents=True, exist_ok=True)
    try:
        trainer = Trainer(cfg, run, data, split, printer, progress)
    except BaseException:
        if created:  # a model that cannot be built (missing features, bad model_args) leaves no run folder
            shutil.rmtree(run, ignore_errors=True)
        raise
    if world.main:
        save_run_files(run, cfg, data)
        if world.active:
            distributed.broadcast(str(run))
    printer(f"run folder: {run}  model: {cfg.model} ({sum(p.numel() for p in trainer.model.parameters()):,} parameters) "
            f"device: {trainer.device}")
    return run, trainer.fit(stop_after=stop_after)


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """One record per run folder under `runs_dir` (oldest first): its name, model, dataset, status
    ("finished"; "unfinished": training now, or stopped with a last.pt to resume from; "empty"
    before its first epoch; "damaged" when its results.json cannot be read), epochs run and allowed, the
    best validation metric and its epoch, test NDCG@10 when finished, and the processes / threads
    of its last epoch. Folders without a readable config.yaml are left out."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise AthweError(f"{root}: no runs folder")
    rows = []
    for run in sorted((p for p in root.iterdir() if (p / "config.yaml").is_file()),
                      key=lambda p: ((p / "config.yaml").stat().st_mtime, p.name)):
        try:
            cfg = load_run_config(run)
        except (AthweError, ConfigError):
            continue
        metric = cfg.train.valid_metric
        epochs = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        best = max(epochs, key=lambda r: (r.get(f"valid_{metric}", -math.inf), -r["epoch"]), default=None)
        row: dict[str, Any] = {"run": str(run), "model": cfg.model, "dataset": cfg.data.dataset,
                               "epochs": len(epochs), "max_epochs": cfg.train.epochs, "valid_metric": metric,
                               "best_valid": best.get(f"valid_{metric}") if best else None,
                               "best_epoch": best["epoch"] if best else None, "test_NDCG@10": None,
                               "processes": epochs[-1].get("processes", 1) if epochs else None,
                               "threads": epochs[-1].get("num_threads") if epochs else None}
        results = run / "results.json"
        if results.is_file():
            try:
                res = json.loads(results.read_text(encoding="utf-8"))
                row.update(status="finished", best_epoch=res["best_epoch"], epochs=res["epochs_run"],
                           **{"test_NDCG@10": res["test"]["NDCG@10"]})
            except (ValueError, KeyError, TypeError):
                row["status"] = "damaged"
        else:
            row["status"] = "unfinished" if (run / "last.pt").is_file() else "empty"
        rows.append(row)
    return rows


def load_run_config(run_dir: str | Path) -> RunConfig:
    run = Path(run_dir)
    path = run / "config.yaml"
    if not path.is_file():
        raise AthweError(f"{run}: not a run folder (no config.yaml)")
    saved = load_yaml(path)
    if not isinstance(saved.get("model"), str):
        raise AthweError(f"{path}: saved run config names no model")
    return config_from_dict(saved, str(path))


#: a run folder's record of the item features it went on with when resumed on re-extracted ones
FEATURES_FILE = "features.json"


def _fingerprint_text(t: Any) -> str | None:
    """An item-feature fingerprint buffer (ATHWE's `feature_fingerprint`) as text; None for none."""
    from athwe.models.athwe import fingerprint_text

    return fingerprint_text(t) if isinstance(t, torch.Tensor) else None


def _saved_feature_fingerprint(state: Any) -> str | None:
    """The item-feature fingerprint a model state dict was trained on (ATHWE's), None without one."""
    return _fingerprint_text(state.get("feature_fingerprint") if isinstance(state, dict) else None)


def feature_changes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's feature changes from its features.json, in order: [{"after_epoch", "from", "to"}];
    empty when the run kept its features."""
    path = Path(run_dir) / FEATURES_FILE
    if not path.is_file():
        return []
    try:
        changes = json.loads(path.read_text(encoding="utf-8")).get("changes")
        if not isinstance(changes, list) or not all(
                isinstance(c, dict) and isinstance(c.get("from"), str) and isinstance(c.get("to"), str)
                and isinstance(c.get("after_epoch"), int) for c in changes):
            raise ValueError("no list of {after_epoch, from, to} under changes")
    except (OSError, ValueError, AttributeError) as e:
        raise AthweError(f"{path}: unreadable record of feature changes ({brief(e)})") from None
    return changes


def accept_recorded_features(model: nn.Module, run_dir: str | Path) -> None:
    """Let `model` load the run's checkpoints from before a recorded feature change: when the run's
    features.json says it went on to the features the model holds now, every fingerprint of that
    record is accepted (the model's own features stay in use)."""
    accepted = getattr(model, "accepted_feature_fingerprints", None)
    mine = _fingerprint_text(getattr(model, "feature_fingerprint", None))
    changes = feature_changes(run_dir)
    if accepted is None or mine is None or mine not in {c["to"] for c in changes}:
        return
    accepted.update(fp for c in changes for fp in (c["from"], c["to"]))


def resume(run_dir: str | Path, printer: Printer = print, progress: bool = True,
           stop_after: int | None = None, num_threads: int | None = None,
           allow_new_features: bool = False) -> dict[str, Any]:
    """Continue an interrupted run from its last.pt; ends as the uninterrupted run would.
    `num_threads` (> 0) replaces the run's train.num_threads for the rest of it: a setting of the
    machine, not of the model, kept out of config.yaml; each epoch's record says what it ran on.
    `allow_new_features` continues an ATHWE run on item features whose fingerprint differs from the
    checkpoint's (extracted again, e.g. on another CPU, whose float embeddings differ in their last
    bits). Such features continue the run without it when the checkpoint's feature sketch shows that
    they agree with the ones it trained on to within SKETCH_TOLERANCE on every item; checkpoints
    saved before sketches were kept need the flag, and then whether the new features are the same in
    substance is the caller's to know. Either way the change is recorded in the run's features.json."""
    if num_threads is not None and num_threads < 0:
        raise AthweError(f"num_threads must be >= 0 (0 = the run's own setting), got {num_threads}")
    run = Path(run_dir)
    cfg = load_run_config(run)
    world, _ = distributed.setup(resolve_device(cfg.train.device))
    if not world.main:
        printer, progress = _quiet, False
    if num_threads and num_threads != cfg.train.num_threads:
        printer(f"note: resuming on {num_threads} CPU thread(s) (the run started with "
                f"{cfg.train.num_threads or 'torch default'})")
        cfg.train.num_threads = num_threads
    last = run / "last.pt"
    if not last.is_file():
        raise AthweError(f"{last}: no checkpoint to resume from")
    if not world.main:  # rank 0 first prepares what is missing (the demo, its features)
        distributed.broadcast(None)
    data, split = load_data(cfg)
    trainer = Trainer(cfg, run, data, split, printer, progress)
    if world.main and world.active:
        distributed.broadcast(None)
    ckpt = load_checkpoint(last)
    model = trainer.model
    accept_recorded_features(model, run)
    old = _saved_feature_fingerprint(ckpt.get("model") if isinstance(ckpt, dict) else None)
    new = _fingerprint_text(getattr(model, "feature_fingerprint", None))
    if old is not None and new is not None and old != new and old not in model.accepted_feature_fingerprints:
        from athwe.models.athwe import SKETCH_TOLERANCE

        same = model.same_features_as(ckpt["model"])
        if not allow_new_features and not same:
            raise AthweError(f"{last}: trained on item features {old}, but the features found now are {new} "
                             f"(extracted again since?); if they come from the same extraction settings (another "
                             f"CPU or thread count changes the last bits of the embeddings), `athwe train --resume "
                             f"{run} --allow-new-features` continues on them; otherwise start a new run")
        epoch = int(ckpt.get("epoch", 0))
        changes = feature_changes(run) + [{"after_epoch": epoch, "from": old, "to": new}]
        if world.main:
            atomic_write_json(run / FEATURES_FILE, {"changes": changes})
        model.accepted_feature_fingerprints.add(old)
        why = (f"they agree with the checkpoint's to within {SKETCH_TOLERANCE:g} on every item" if same
               else "--allow-new-features")
        printer(f"note: continuing on item features {new} after epoch {epoch} (the run trained on {old} so far; "
                f"{why}); recorded in {run / FEATURES_FILE}")
    try:
        trainer.load_state(ckpt)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise AthweError(f"{last}: not a checkpoint of this run ({type(e).__name__}: {brief(e)})") from None
    # drop epoch records written after the checkpoint (a kill between the two writes) and a line
    # cut short by a kill during its append
    mpath = run / "metrics.jsonl"
    if mpath.is_file():
        rows = [r for r in read_metrics(mpath) if r["epoch"] <= trainer.epoch]
        if world.main:
            atomic_write_text(mpath, "".join(json.dumps(r) + "\n" for r in rows))  # as fit() appends them
    printer(f"resuming {run} after epoch {trainer.epoch} (best {cfg.train.valid_metric} {trainer.best_metric:.4f} at epoch {trainer.best_epoch})")
    return trainer.fit(stop_after=stop_after)


def load_run_model(run_dir: str | Path) -> tuple[SequentialRecommender, SequenceData, RunConfig]:
    """A finished run's model (best checkpoint, eval mode) with its data; checks the item map."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    best = run / "best.pt"
    if not best.is_file():
        raise AthweError(f"{best}: run has no best checkpoint yet")
    if cfg.data.dataset == "demo":
        from athwe.dataset.demo import ensure_demo

        ensure_demo(cfg.data.data_dir)
    data = load_sequences(cfg.data.data_dir, cfg.data.dataset, kcore=cfg.data.kcore)
    map_path = run / "item_map.json"
    if not map_path.is_file():
        raise AthweError(f"{run}: not a complete run folder (no item_map.json)")
    item_map = read_json(map_path)
    saved = item_map.get("fingerprint") if isinstance(item_map, dict) else None
    if not isinstance(saved, str):
        raise AthweError(f"{map_path}: has no item-map fingerprint")
    if saved != data.item_fingerprint:
        raise AthweError(f"{run}: item map {saved} does not match dataset {cfg.data.dataset} ({data.item_fingerprint})")
    try:
        device = resolve_device(cfg.train.device)
    except ConfigError:  # trained on a GPU this machine lacks: evaluate where it can
        device = resolve_device("auto")
    features = load_model_features(cfg, data, progress=False)
    model = create_model(cfg.model, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss,
                         features).to(device)
    accept_recorded_features(model, run)
    load_weights(model, load_checkpoint(best, device), best)
    model.eval()
    return model, data, cfg


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
