"""Paired comparisons of finished runs on the same test users.

Two models evaluated on the same dataset and split rank the same test targets, so their difference
is best judged user by user: each user's NDCG@K is averaged over a row's seeds, and the relative
difference of the means is bootstrapped over users (the spread a different draw of test users
would give). Seed-to-seed training noise enters through the per-user averages; with few seeds it
is not fully captured, which the tables say.

Per-run test ranks are computed once from the run's best checkpoint and kept beside it
(`test_ranks.pt`: the test rows' user indices and target ranks). A table keeps its runs' ranks
too (`<table>.ranks.json`, `save_stored`), so its comparisons can be computed again after the run
folders are gone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from athwe.evaluation.metrics import ndcg_per_row as ndcg_per_user  # one row per test user
from athwe.utils import atomic_torch_save, atomic_write_text

RANKS_FILE = "test_ranks.pt"
#: stored ranks: run folder name -> (users, ranks)
Stored = dict[str, tuple[torch.Tensor, torch.Tensor]]


def stored_path(out: str | Path) -> Path:
    return Path(str(out) + ".ranks.json")


def load_stored(out: str | Path) -> Stored:
    """The ranks a table kept for its runs (`<out>.ranks.json`); {} when there are none."""
    try:
        runs = json.loads(stored_path(out).read_text())["runs"]
        return {name: (torch.tensor(v["users"], dtype=torch.long), torch.tensor(v["ranks"], dtype=torch.long))
                for name, v in runs.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_stored(out: str | Path, stored: Stored) -> None:
    """Write `stored` to `<out>.ranks.json` (through a temporary file)."""
    path = stored_path(out)
    body = {"about": "test users (row indices) and 0-based target ranks of each run in the table beside this file",
            "runs": {name: {"users": u.tolist(), "ranks": r.tolist()} for name, (u, r) in sorted(stored.items())}}
    atomic_write_text(path, json.dumps(body, separators=(",", ":")) + "\n")


def test_ranks(run_dir: str | Path, stored: Stored | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, ranks) of a finished run's test rows (ranks 0-based: items scored strictly higher),
    from its best checkpoint, cached in the run folder (written atomically); without a checkpoint,
    from `stored` (keyed by the run folder's name). FileNotFoundError when neither has them."""
    run = Path(run_dir)
    cache = run / RANKS_FILE
    best = run / "best.pt"
    if not best.is_file():
        if stored and run.name in stored:
            return stored[run.name]
        raise FileNotFoundError(f"{run}: no checkpoint here and no stored test ranks")
    if cache.is_file() and cache.stat().st_mtime >= best.stat().st_mtime:
        saved = torch.load(cache, weights_only=True)
        return saved["users"], saved["ranks"]
    from athwe.runs import evaluate_run_rows

    _, users, ranks = evaluate_run_rows(run, "test")
    atomic_torch_save({"users": users, "ranks": ranks}, cache)
    return users, ranks


def row_ndcg(run_dirs: list[str | Path], k: int, stored: Stored | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, NDCG@k per user averaged over the runs); every run must have the same test users."""
    users, total = None, None
    for run in run_dirs:
        u, r = test_ranks(run, stored)
        order = torch.argsort(u)
        u, v = u[order], ndcg_per_user(r[order], k)
        if users is None:
            users, total = u, v
        elif not torch.equal(u, users):
            raise ValueError(f"{run}: its test users differ from {run_dirs[0]}'s")
        else:
            total = total + v
    if users is None:
        raise ValueError("no runs")
    return users, total / len(run_dirs)


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Relative difference mean(a) / mean(b) - 1 of paired per-user values, with the 2.5 and 97.5
    percentiles over `resamples` bootstrap draws of the users and the share of draws where a is
    ahead."""
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired_bootstrap needs two 1-d tensors of the same non-zero length")
    g = torch.Generator().manual_seed(seed)
    n = len(a)
    rel = []
    for chunk in range(0, resamples, 1000):
        idx = torch.randint(0, n, (min(1000, resamples - chunk), n), generator=g)
        rel.append(a.double()[idx].mean(1) / b.double()[idx].mean(1).clamp(min=1e-12) - 1.0)
    draws = torch.cat(rel)
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"rel": float(a.double().mean() / b.double().mean() - 1.0), "lo": lo, "hi": hi,
            "ahead": float((draws > 0).double().mean()), "users": n, "resamples": resamples}


def compare_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], k: int = 10,
                 stored: Stored | None = None) -> dict[str, float]:
    """paired_bootstrap of NDCG@k between two table rows' runs (each a list of run records with a
    'run_dir'); ranks of runs without a folder here come from `stored`."""
    _, a = row_ndcg([x["run_dir"] for x in rows_a], k, stored)
    _, b = row_ndcg([x["run_dir"] for x in rows_b], k, stored)
    return paired_bootstrap(a, b)
