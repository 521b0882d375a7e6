"""The trainer: Adam, CE or BCE, early stopping, best-checkpoint test, exact resume.

It writes its run folder through athwe.runs (config, item map, metrics, checkpoints, results) and
TensorBoard event files beside them, and ends by building the run's retrieval index from the trained
model's item vectors. An `on_epoch` callback sees each epoch's record and may end training early
(StopTraining: a hyper-parameter study pruning a trial). Under torchrun several processes train one
run data-parallel (athwe.training.distributed).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from athwe import runs
from athwe.config import RunConfig, history_mode
from athwe.dataset.sequences import SequenceData
from athwe.dataset.split import Batch, SampleSet, Split
from athwe.errors import AthweError, ConfigError, brief
from athwe.evaluation.metrics import KS, evaluate, metrics_from_ranks
from athwe.models import SequentialRecommender, check_run_config, create_model
from athwe.retrieval import write_run_index
from athwe.runs import load_data
from athwe.training import distributed
from athwe.utils import (busy_cpus_elsewhere, keep_freed_memory, oversubscription_note, resolve_device,
                         seed_everything)

Printer = Callable[[str], None]
#: called after each epoch's validation with (epoch, the epoch's metrics.jsonl record)
EpochCallback = Callable[[int, dict[str, Any]], None]
#: seconds between progress lines inside an epoch when stderr is not a terminal
PROGRESS_SECONDS = 30.0


_start_threads: int | None = None


def default_threads() -> int:
    """torch's thread count when the first run of this process started: the most a run uses."""
    global _start_threads
    if _start_threads is None:
        _start_threads = torch.get_num_threads()
    return _start_threads


def free_threads(busy: float | None, most: int) -> int:
    """Threads for a run with train.num_threads 0: the `most` CPUs less those other processes keep
    `busy` (rounded), at least one; all `most` where nothing was measured."""
    if busy is None:
        return most
    return max(1, min(most, int(most - busy + 0.5)))


def autocast_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """A factory of the context a training step runs in: bfloat16 autocast for precision bf16 (no
    loss scaling is needed: bfloat16 has float32's exponent range), a no-op for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def sample_negatives(batch: Batch, n_items: int, rounds: int = 20) -> torch.Tensor:
    """One random item per row that is neither the target nor in the input (global torch RNG)."""
    neg = torch.randint(1, n_items + 1, (len(batch),))
    for _ in range(rounds):
        bad = (neg == batch.target) | (batch.input_ids == neg.unsqueeze(1)).any(1)
        if not bool(bad.any()):
            break
        neg[bad] = torch.randint(1, n_items + 1, (int(bad.sum()),))
    return neg


class StopTraining(Exception):
    """Raised by an on_epoch callback to end training after the current epoch: the run finishes as it
    stands (best checkpoint so far, test metrics, index) with status "pruned" in results.json, the
    exception's message as the reason."""


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
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))



def adam(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """The trainer's optimizer: Adam with the fused kernel on CPU and CUDA, which updates every
    parameter in one pass (several times faster than the per-parameter loop)."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=device.type in ("cpu", "cuda"))

class Trainer:
    """Trains one model on one split; every state needed for an exact resume lives in last.pt."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: SequenceData, split: Split,
                 printer: Printer = print, progress: bool = True, on_epoch: EpochCallback | None = None):
        self.cfg, self.run_dir, self.data, self.split = cfg, run_dir, data, split
        self.on_epoch = on_epoch
        self.tb: Any = None  # the run's TensorBoard SummaryWriter while fit() runs (rank 0)
        # under torchrun: this process's rank and device (cuda:LOCAL_RANK); rank 0 alone prints and writes
        self.world, self.device = distributed.setup(resolve_device(cfg.train.device))
        self.print = printer if self.world.main else _quiet
        self.progress = progress and self.world.main
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if self.device.type == "cpu":
            busy = busy_cpus_elsewhere()
            if cfg.train.num_threads == 0 and not self.world.active:
                # the CPUs free when the run starts: torch's threads wait for each other at every
                # operation, so a thread that shares its core with another process slows them all
                threads = free_threads(busy, default_threads())
                torch.set_num_threads(threads)
                if threads < default_threads():
                    printer(f"note: other processes keep about {busy:.1f} CPUs busy: training on {threads} "
                            f"thread(s) (--threads N sets them)")
            else:
                note = oversubscription_note(torch.get_num_threads(), busy, os.cpu_count())
                if note:
                    printer(f"note: {note}")
        if cfg.train.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision bf16: {torch.cuda.get_device_name(self.device)} "
                              "has no bfloat16 support; use train.precision fp32")
        self.autocast = autocast_context(self.device, cfg.train.precision)
        keep_freed_memory()
        features = runs.load_model_features(cfg, data, printer, progress)
        seed_everything(cfg.train.seed)
        self.model: SequentialRecommender = create_model(
            cfg.model, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss, features).to(self.device)
        self.model.prepare(split.train)
        for note in self.model.training_notes(split.train):
            printer(f"note: {note}")
        self.optimizer = adam(self.model, cfg.train.lr, cfg.train.weight_decay, self.device)
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
        g = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + self.epoch) % 2**63)
        perm = torch.randperm(len(train), generator=g)
        bs = self.cfg.train.batch_size
        total, steps = 0.0, 0
        # a bar on a terminal; where stderr is not one (a log file), a line every PROGRESS_SECONDS
        lines = self.progress and not sys.stderr.isatty()
        bar = tqdm(range(0, len(train), bs), desc=f"epoch {self.epoch + 1}", leave=False,
                   disable=not self.progress or lines, unit="batch")
        t0 = last = time.perf_counter()
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
            if not math.isfinite(value):  # before the step: the weights stay those of the last good step
                raise self.diverged(f"step {steps + 1}: the training loss is {value}")
            self.optimizer.step()
            total += value
            steps += 1
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
            if lines and time.perf_counter() - last >= PROGRESS_SECONDS:
                last = time.perf_counter()
                done = min(start + bs, len(train))
                self.print(f"epoch {self.epoch + 1}: {done:,}/{len(train):,} samples, loss {total / steps:.4f}, "
                           f"{done / (last - t0):.0f} samples/s")
        return total / max(steps, 1)

    def diverged(self, what: str) -> AthweError:
        """The one-line error that ends a run whose loss or weights stopped being finite."""
        t = self.cfg.train
        cause = f"the learning rate (train.lr {t.lr:g}) is likely too high for this model"
        if t.precision == "bf16":
            cause += ", or bf16 precision overflows (try --precision fp32)"
        kept = (f"{self.run_dir / runs.BEST} keeps epoch {self.best_epoch}" if self.best_epoch
                else "no epoch had finished, so nothing was kept")
        return AthweError(f"training diverged in epoch {self.epoch + 1}, {what}: {cause}; {kept}")

    def evaluate(self, samples: SampleSet) -> dict[str, float]:
        self.model.eval()
        shard = (self.world.rank, self.world.size) if self.world.active else None
        metrics, ranks = evaluate(self.model.scores, samples, self.history, self.cfg.train.eval_batch_size,
                                  self.device, trim=self.model.supports_trimming, shard=shard)
        if shard is None:
            return metrics
        return metrics_from_ranks(distributed.all_sum(ranks), KS)  # every process's users: exact metrics

    # -- TensorBoard and the epoch callback ---------------------------------------------------------
    def open_tensorboard(self) -> Any:
        """The run's SummaryWriter (rank 0, train.tensorboard on), else None. A resumed run continues the
        same event stream: purge_step drops whatever the interrupted process logged after last.pt."""
        if not (self.cfg.train.tensorboard and self.world.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard: the tensorboard package is not installed; install it or "
                              "set train.tensorboard false") from None
        return SummaryWriter(str(self.run_dir), purge_step=self.epoch + 1 if self.epoch else None)

    def log_epoch(self, loss: float, seconds: float, valid: dict[str, float]) -> None:
        """One epoch's scalars at step = epoch: loss, learning rate, speed, every validation metric."""
        if self.tb is None:
            return
        step = self.epoch
        self.tb.add_scalar("train/loss", loss, step)
        self.tb.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
        self.tb.add_scalar("train/samples_per_s", len(self.split.train) / seconds, step)
        self.tb.add_scalar("train/epoch_seconds", seconds, step)
        for k, v in valid.items():
            self.tb.add_scalar(f"valid/{k}", v, step)
        self.tb.flush()

    def epoch_hook(self, record: dict[str, Any]) -> str | None:
        """Call on_epoch (rank 0) with the epoch's record; the reason it gave when it raised
        StopTraining, else None. Under torchrun every process learns rank 0's answer."""
        if self.on_epoch is None:
            return None
        reason = None
        if self.world.main:
            try:
                self.on_epoch(self.epoch, dict(record))
            except StopTraining as e:
                reason = str(e) or "stopped by the on_epoch callback"
        if self.world.active:
            reason = distributed.broadcast(reason)
        return reason

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until early stopping, the epoch limit or on_epoch's StopTraining; `stop_after` ends this
        call after that many epochs (used to test resume), leaving last.pt to continue from. The
        TensorBoard writer is closed on every way out, errors included."""
        self.tb = self.open_tensorboard()
        try:
            return self._fit(stop_after)
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        cfg = self.cfg.train
        metric = cfg.valid_metric
        done_now = 0
        while self.epoch < cfg.epochs and self.bad_epochs < cfg.patience:
            t0 = time.perf_counter()
            loss = self.train_epoch()
            broken = runs.nonfinite_parameter(self.model)
            if broken is not None:
                raise self.diverged(f"after its last step: parameter {broken} is not finite")
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
                    runs.save_best(self.run_dir, self.model)
            else:
                self.bad_epochs += 1
            record = {"epoch": self.epoch, "train_loss": round(loss, 6), "train_seconds": round(dt, 3),
                      "samples_per_s": round(len(self.split.train) / dt, 1), "num_threads": torch.get_num_threads(),
                      **({"processes": self.world.size} if self.world.active else {}),
                      **{f"valid_{k}": round(v, 6) for k, v in valid.items()}}
            self.log_epoch(loss, dt, valid)  # before last.pt: a resume purges what comes after its epoch
            state = self.state()  # every process takes part (under torchrun it gathers their RNG states)
            if main:
                runs.append_metrics(self.run_dir, record)
                runs.save_last(self.run_dir, state)
            if self.world.active:
                distributed.barrier()  # the checkpoints are written before any process reads them
            self.print(f"epoch {self.epoch:3d}  loss {loss:.4f}  valid {metric} {valid[metric]:.4f}"
                       f"{'  *' if improved else ''}  ({dt:.1f}s, {record['samples_per_s']:.0f} samples/s)")
            stopped = self.epoch_hook(record)
            if stopped is not None:
                self.print(f"stopped after epoch {self.epoch}: {stopped}")
                return self.finish(stopped)
            done_now += 1
            if stop_after is not None and done_now >= stop_after and self.epoch < cfg.epochs:
                return {}
        return self.finish()

    def finish(self, stopped: str | None = None) -> dict[str, Any]:
        """Test the best checkpoint and write results.json (status "finished", or "pruned" with the
        reason when on_epoch stopped the run: its test metrics are those of the best epoch so far)."""
        best = self.run_dir / runs.BEST
        if best.is_file():
            runs.load_weights(self.model, runs.load_checkpoint(best, self.device), best)
        valid = self.evaluate(self.split.valid)
        test = self.evaluate(self.split.test)
        results = {
            "header": runs.results_header(self.cfg),
            "status": "pruned" if stopped is not None else "finished",
            **({"stopped": stopped} if stopped is not None else {}),
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
        if self.tb is not None:  # the best checkpoint's test metrics, at its epoch
            for k, v in test.items():
                self.tb.add_scalar(f"test/{k}", v, self.best_epoch)
            self.tb.flush()
        runs.write_results(self.run_dir, results)
        self.print(runs.format_results(results["header"], test))
        if self.build_index:  # from the best weights, which the model holds now
            meta = write_run_index(self.run_dir, self.model, self.data.item_fingerprint)
            self.print(f"index: {meta['kind']} over {meta['n_items']:,} items in {self.run_dir / 'index.faiss'}")
        return results


def train(cfg: RunConfig, run_dir: str | Path | None = None, printer: Printer = print, progress: bool = True,
          stop_after: int | None = None, on_epoch: EpochCallback | None = None) -> tuple[Path, dict[str, Any]]:
    """Train a model from a resolved config into a new run folder; returns (run_dir, results).
    `on_epoch(epoch, record)` runs after each validation (rank 0) and may raise StopTraining.
    Under torchrun every process calls it; rank 0 creates the folder and prints."""
    check_run_config(cfg)  # model settings included: wrong ones fail before the data is read
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
    fresh: Path | None = None  # the outermost folder this call creates, removed again if it keeps nothing
    if world.main:
        target = Path(run_dir) if run_dir else Path(cfg.train.runs_dir) / "-"
        fresh = _outermost_missing(target)
        run = Path(run_dir) if run_dir else runs.new_run_dir(cfg)
        if fresh == target:
            fresh = run
        elif fresh is None and not any(run.iterdir()):
            fresh = run
        run.mkdir(parents=True, exist_ok=True)
    try:
        trainer = Trainer(cfg, run, data, split, printer, progress, on_epoch)
    except BaseException:
        if fresh is not None:  # a model that cannot be built (missing features, bad model_args) leaves no folder
            shutil.rmtree(fresh, ignore_errors=True)
        raise
    if world.main:
        runs.save_run_files(run, cfg, data)
        if world.active:
            distributed.broadcast(str(run))
    printer(f"run folder: {run}  model: {cfg.model} "
            f"({sum(p.numel() for p in trainer.model.parameters()):,} parameters) "
            f"device: {trainer.device}")
    try:
        return run, trainer.fit(stop_after=stop_after)
    except AthweError:  # diverged: a folder without a finished epoch holds nothing to keep
        if fresh is not None and not (run / runs.LAST).exists():
            shutil.rmtree(fresh, ignore_errors=True)
        raise


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder on the way to `path` (itself included) that does not exist yet."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def resume(run_dir: str | Path, printer: Printer = print, progress: bool = True,
           stop_after: int | None = None, num_threads: int | None = None,
           on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Continue an interrupted run from its last.pt; ends as the uninterrupted run would.
    `num_threads` (> 0) replaces the run's train.num_threads for the rest of it: a setting of the
    machine, not of the model, kept out of config.yaml; each epoch's record says what it ran on."""
    if num_threads is not None and num_threads < 0:
        raise AthweError(f"num_threads must be >= 0 (0 = the run's own setting), got {num_threads}")
    run = Path(run_dir)
    cfg = runs.load_run_config(run)
    world, _ = distributed.setup(resolve_device(cfg.train.device))
    if not world.main:
        printer, progress = _quiet, False
    if num_threads and num_threads != cfg.train.num_threads:
        printer(f"note: resuming on {num_threads} CPU thread(s) (the run started with "
                f"{cfg.train.num_threads or 'the free CPUs'})")
        cfg.train.num_threads = num_threads
    last = run / runs.LAST
    if not last.is_file():
        raise AthweError(f"{last}: no checkpoint to resume from")
    if not world.main:  # rank 0 first prepares what is missing (the demo, its features)
        distributed.broadcast(None)
    data, split = load_data(cfg)
    trainer = Trainer(cfg, run, data, split, printer, progress, on_epoch)
    if world.main and world.active:
        distributed.broadcast(None)
    ckpt = runs.load_checkpoint(last)
    try:
        trainer.load_state(ckpt)
    except AthweError as e:  # the model's own load check (ATHWE: features produced differently)
        raise AthweError(f"{last}: {e}") from None
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise AthweError(f"{last}: not a checkpoint of this run ({type(e).__name__}: {brief(e)})") from None
    if world.main:
        runs.keep_metrics_until(run, trainer.epoch)
    printer(f"resuming {run} after epoch {trainer.epoch} (best {cfg.train.valid_metric} "
            f"{trainer.best_metric:.4f} at epoch {trainer.best_epoch})")
    return trainer.fit(stop_after=stop_after)
