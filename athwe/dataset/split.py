"""Chronological leave-one-out split and training-sample construction (specs/protocol.md).

Presets:
- ``bsarec``: training window w = s[-(N+2):-2]; every prefix of w is a sample (input prefix[:-1],
  target prefix[-1]), the first one with an empty input. History items score 0 at evaluation.
- ``recbole``: every position of s[:-2] after the first is a target, context truncated to N.
  History stays rankable.
All inputs are left-padded to N with item 0 (timestamp 0 at padding); models read the last position.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from athwe.dataset.sequences import SequenceData

PRESETS = ("bsarec", "recbole")
PRESET_HISTORY = {"bsarec": "zero", "recbole": "none"}


@dataclass
class Batch:
    """What models consume. input_ids/timestamps (B, N) left-padded; target (B,)."""

    input_ids: torch.Tensor
    timestamps: torch.Tensor
    target: torch.Tensor
    user: torch.Tensor
    target_time: torch.Tensor
    neg: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f.name: (None if getattr(self, f.name) is None
                                 else getattr(self, f.name).to(device, non_blocking=True))
                        for f in fields(self)})

    def __len__(self) -> int:
        return self.target.shape[0]


@dataclass
class SampleSet:
    """A set of (input, target) samples. For evaluation sets, `history_ptr/history_items` hold each
    row's full known history (CSR) for optional masking."""

    input_ids: torch.Tensor  # int64 (S, N)
    timestamps: torch.Tensor  # float64 (S, N)
    target: torch.Tensor  # int64 (S,)
    user: torch.Tensor  # int64 (S,)
    target_time: torch.Tensor  # float64 (S,)
    history_ptr: torch.Tensor | None = None
    history_items: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.target.shape[0]

    def batch(self, idx: torch.Tensor | slice) -> Batch:
        return Batch(self.input_ids[idx], self.timestamps[idx], self.target[idx], self.user[idx],
                     self.target_time[idx])

    def history_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index within `rows`, item id) pairs of those rows' histories."""
        assert self.history_ptr is not None and self.history_items is not None
        start = self.history_ptr[rows]
        count = self.history_ptr[rows + 1] - start
        row_of = torch.repeat_interleave(torch.arange(len(rows)), count)
        base = torch.repeat_interleave(start - torch.cumsum(count, 0) + count, count)
        pos = torch.arange(int(count.sum())) + base
        return row_of, self.history_items[pos]


@dataclass
class Split:
    train: SampleSet
    valid: SampleSet
    test: SampleSet
    preset: str
    max_seq_length: int
    skipped_users: int


def _gather(data: SequenceData, pos: torch.Tensor, ctx_start: torch.Tensor,
            n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded windows flat[max(ctx_start, pos-n):pos] as (S, n) ids and times."""
    idx = pos.unsqueeze(1) - n + torch.arange(n).unsqueeze(0)
    valid = idx >= ctx_start.unsqueeze(1)
    safe = idx.clamp(min=0)
    ids = torch.where(valid, data.items[safe], torch.zeros((), dtype=torch.long))
    ts = torch.where(valid, data.times[safe], torch.zeros((), dtype=torch.float64))
    return ids, ts


def _ranges(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate arange(start, end) for each pair; also return the owner index of each element."""
    counts = (ends - starts).clamp(min=0)
    owner = torch.repeat_interleave(torch.arange(len(starts)), counts)
    base = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
    return torch.arange(int(counts.sum())) + base, owner


def build_split(data: SequenceData, max_seq_length: int, preset: str = "bsarec") -> Split:
    """Leave-one-out split of users with >= 3 interactions; shorter users are skipped (counted)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
    n = max_seq_length
    lengths = data.lengths
    users = torch.nonzero(lengths >= 3).squeeze(1)
    o = data.offsets[users]
    L = lengths[users]
    if preset == "bsarec":
        train_start = torch.maximum(o, o + L - 2 - n)
        pos, owner = _ranges(train_start, o + L - 2)
        ctx = train_start[owner]
    else:
        pos, owner = _ranges(o + 1, o + L - 2)
        ctx = o[owner]
    ids, ts = _gather(data, pos, ctx, n)
    train = SampleSet(ids, ts, data.items[pos], users[owner], data.times[pos])

    def eval_set(shift: int) -> SampleSet:
        p = o + L - shift
        e_ids, e_ts = _gather(data, p, o, n)
        hist_pos, _ = _ranges(o, p)
        ptr = torch.zeros(len(users) + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(p - o, 0)
        return SampleSet(e_ids, e_ts, data.items[p], users, data.times[p], ptr, data.items[hist_pos])

    return Split(train, eval_set(2), eval_set(1), preset, n, int((lengths < 3).sum()))
