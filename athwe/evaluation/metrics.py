"""Full-ranking evaluation: every item is scored for every user; never sampled negatives.

Tie rule: a target's rank is the number of items with a strictly higher score (ties are resolved
in the target's favour). Padding (item 0) is always excluded. History handling:
- ``none``: history items stay rankable (RecBole, repeat consumption allowed);
- ``zero``: history items' scores are set to 0 (the BSARec/WEARec code's behaviour, kept as a
  named option: items scored below 0 then rank under already-seen items);
- ``exclude``: history items are removed from the ranking (a target that also appears in the
  history then counts as a miss).

A row with a score that is not finite (NaN or infinite: a diverged model) counts as a miss, never
a hit, and the metrics report how many rows had one (``nonfinite_rows``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from athwe.dataset.split import SampleSet

KS = (5, 10, 20, 50)
MISS_RANK = 1 << 40  # rank given to a target that was removed from the ranking (never within any K)
HISTORY_MODES = ("none", "zero", "exclude")


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of items scored strictly above the target, per row. Scores must be float."""
    t = scores.gather(1, target.unsqueeze(1))
    return (scores > t).sum(1, dtype=torch.int32).long()  # int32 accumulation: faster than int64


def apply_history(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor, mode: str) -> None:
    """In place: mask (row, item) history pairs according to `mode`."""
    if mode == "none" or rows.numel() == 0:
        return
    value = 0.0 if mode == "zero" else float("-inf")
    scores[rows.to(scores.device), items.to(scores.device)] = value


def ndcg_per_row(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k of each row (one target per row): 1 / log2(rank + 2) for rank < k, else 0 (float64)."""
    r = ranks.double()
    return torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR, NDCG and MRR at each K, averaged over rows (one target per row)."""
    r = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(ndcg_per_row(ranks, k).mean())
        out[f"MRR@{k}"] = float(torch.where(hit, 1.0 / (r + 1.0), torch.zeros_like(r)).mean())
    return out


def _batches(samples: SampleSet, batch_size: int, trim: bool):
    """Row batches; with `trim`, rows of equal history length go together and keep exactly their own
    width, so a row's result never depends on which other rows share its batch."""
    n = samples.input_ids.shape[1]
    if not trim:
        for start in range(0, len(samples), batch_size):
            yield torch.arange(start, min(start + batch_size, len(samples))), n
        return
    lengths = (samples.input_ids > 0).sum(1).clamp(min=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    start = 0
    for width, count in zip(values.tolist(), counts.tolist()):
        for s in range(start, start + count, batch_size):
            yield order[s:min(s + batch_size, start + count)], width
        start += count


@torch.inference_mode()
def evaluate(score_fn: Callable, samples: SampleSet, history: str = "none", batch_size: int = 1024,
             device: torch.device | str = "cpu", ks: tuple[int, ...] = KS,
             trim: bool = False, shard: tuple[int, int] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Rank every item for every row of `samples`. `score_fn(batch)` returns (B, n_items+1) scores.
    Returns (metrics, ranks). Results do not depend on batch_size (ranks are per row). Rows with
    a non-finite score rank their target as a miss; `metrics["nonfinite_rows"]` counts them (the key
    is there only when there are any).
    `shard` (i, n) ranks only the rows r with r mod n == i and leaves the other ranks 0 (the
    metrics then cover a part: sum the ranks of all n shards and call `metrics_from_ranks`).

    With `trim` (for models whose output ignores padded positions exactly, e.g. masked attention),
    each row is encoded without its leading padding columns, so short histories cost little;
    models take position ids right-aligned to N."""
    if history not in HISTORY_MODES:
        raise ValueError(f"unknown history mode {history!r} (one of {', '.join(HISTORY_MODES)})")
    ranks = (torch.empty(len(samples), dtype=torch.long) if shard is None
             else torch.zeros(len(samples), dtype=torch.long))
    nonfinite = 0
    for rows, width in _batches(samples, batch_size, trim):
        if shard is not None:
            rows = rows[rows % shard[1] == shard[0]]
            if not len(rows):
                continue
        batch = samples.batch(rows)
        if width < batch.input_ids.shape[1]:
            batch.input_ids, batch.timestamps = batch.input_ids[:, -width:], batch.timestamps[:, -width:]
        batch = batch.to(device)
        scores = score_fn(batch).float()
        broken = ~torch.isfinite(scores[:, 1:]).all(1)  # NaN > t is never true: such a row would rank first
        if history != "none":
            r, it = samples.history_of(rows)
            apply_history(scores, r, it, history)
        scores[:, 0] = -math.inf
        rank = rank_of_target(scores, batch.target)
        if history == "exclude":  # a target removed from the ranking is a miss, whatever the catalogue size
            rank = torch.where(torch.isneginf(scores.gather(1, batch.target.unsqueeze(1))).squeeze(1),
                               torch.full_like(rank, MISS_RANK), rank)
        if bool(broken.any()):
            rank = torch.where(broken, torch.full_like(rank, MISS_RANK), rank)
            nonfinite += int(broken.sum())
        ranks[rows] = rank.cpu()
    metrics = metrics_from_ranks(ranks, ks)
    if nonfinite:
        metrics["nonfinite_rows"] = float(nonfinite)
    return metrics, ranks
