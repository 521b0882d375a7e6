"""Load a dataset folder into chronological per-user item sequences with an item map.

The result is cached (keyed on the source files' size and mtime and the options), so a second
run does not re-parse text files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from athwe.dataset.atomic import open_text, read_atomic, read_sequence_txt
from athwe.errors import ConfigError, DataError
from athwe.utils import atomic_torch_save, fingerprint_tokens

PAD_TOKEN = "[PAD]"
CACHE_VERSION = 2  # 2: user and item id columns must be typed token
# largest BSARec .txt item id: ids are kept as given, so the item table has (max id + 1) rows
MAX_TXT_ITEM_ID = 10_000_000


@dataclass
class SequenceData:
    """All users' chronological sequences, flattened. Internal item ids 1..n_items, 0 = padding.

    User u's items are items[offsets[u]:offsets[u+1]], with timestamps in the same slice.
    Without real timestamps (BSARec .txt files) `times` holds the position index.
    """

    name: str
    item_tokens: list[str]  # index = internal id; [0] is the padding token
    user_tokens: list[str]
    items: torch.Tensor  # int64 (total,)
    times: torch.Tensor  # float64 (total,)
    offsets: torch.Tensor  # int64 (n_users + 1,)
    has_timestamps: bool
    source: str

    @property
    def n_items(self) -> int:
        return len(self.item_tokens) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_tokens)

    @property
    def n_interactions(self) -> int:
        return int(self.items.numel())

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def item_fingerprint(self) -> str:
        return fingerprint_tokens(self.item_tokens)

    def item_map(self) -> dict:
        return {"fingerprint": self.item_fingerprint, "tokens": self.item_tokens}

    def timestamp_ties(self) -> int:
        """Interactions whose timestamp equals the previous interaction of the same user."""
        return int((self.gaps() == 0).sum())

    def gaps(self) -> torch.Tensor:
        """Seconds between each interaction and the same user's previous one (float64, one entry
        per interaction after a user's first); empty without real timestamps."""
        if not self.has_timestamps or self.n_interactions < 2:
            return torch.zeros(0, dtype=torch.float64)
        starts = torch.zeros(self.n_interactions, dtype=torch.bool)
        starts[self.offsets[:-1][self.lengths > 0]] = True
        return (self.times[1:] - self.times[:-1])[~starts[1:]]

    def summary(self) -> dict:
        lens = self.lengths.double()
        return {
            "dataset": self.name,
            "source": self.source,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": self.n_interactions / max(1, self.n_users * self.n_items),
            "seq_len_min": int(lens.min()),
            "seq_len_median": float(lens.median()),
            "seq_len_mean": round(float(lens.mean()), 2),
            "seq_len_p90": float(torch.quantile(lens, 0.9)),
            "seq_len_max": int(lens.max()),
            "has_timestamps": self.has_timestamps,
            "timestamp_ties": self.timestamp_ties(),
            "gap_seconds": gap_quantiles(self.gaps()),
            "item_fingerprint": self.item_fingerprint,
        }


GAP_QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)


def gap_quantiles(gaps: torch.Tensor) -> dict[str, float]:
    """{"p25": ..., "p50": ..., ..., "p99": ...} of `gaps` in seconds ({} when there are none)."""
    if gaps.numel() == 0:
        return {}
    q = torch.quantile(gaps.double(), torch.tensor(GAP_QUANTILES, dtype=torch.float64))
    return {f"p{round(p * 100)}": float(v) for p, v in zip(GAP_QUANTILES, q)}


def format_seconds(s: float) -> str:
    """A duration for people: 0 s, 37 s, 12 min, 5.2 h, 3.7 d, 1.4 y."""
    for unit, size in (("y", 365.25 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.2g} {unit}" if s < 10 * size else f"{s / size:.0f} {unit}"
    return f"{s:.0f} s"


def dataset_dir(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / name


def find_source(data_dir: str | Path, name: str) -> tuple[str, Path]:
    """Which reader applies to dataset `name`: ('atomic', x.inter) or ('txt', x.txt)."""
    d = dataset_dir(data_dir, name)
    if not d.is_dir():
        raise DataError(f"{d}: dataset folder not found (pass --data-dir, or import the data first)")
    inter = d / f"{name}.inter"
    txt = d / f"{name}.txt"
    if inter.is_file():
        return "atomic", inter
    if txt.is_file():
        return "txt", txt
    raise DataError(f"{d}: no {name}.inter (RecBole atomic) or {name}.txt (BSARec sequences) file")


def cache_root() -> Path:
    return Path(os.environ.get("ATHWE_CACHE_DIR", Path.home() / ".cache" / "athwe"))


def load_sequences(data_dir: str | Path, name: str, kcore: int = 0, use_cache: bool = True) -> SequenceData:
    """Read, optionally k-core filter, and chronologically sort dataset `name`."""
    if kcore < 0:
        raise ConfigError(f"kcore must be >= 0 (0 = no filtering), got {kcore}")
    kind, path = find_source(data_dir, name)
    st = path.stat()
    key_src = json.dumps([CACHE_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns, kcore])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache_file = cache_root() / "prepared" / f"{name}-{key}.pt"
    if use_cache and cache_file.is_file():
        try:
            blob = torch.load(cache_file, weights_only=True)
            return SequenceData(**blob)
        except Exception:
            pass  # a stale or unreadable cache is rebuilt below
    if kind == "atomic":
        data = _from_atomic(path, name, kcore)
    else:
        data = _from_txt(path, name, kcore)
    if use_cache:
        try:
            atomic_torch_save(data.__dict__, cache_file)
        except OSError:
            pass  # caching is an optimisation; a read-only home must not fail the run
    return data


def _kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _build(name: str, source: str, u_idx: np.ndarray, i_idx: np.ndarray, times: np.ndarray,
           user_tokens: list[str], item_tokens: list[str], has_ts: bool, kcore: int,
           identity_items: bool = False) -> SequenceData:
    keep = _kcore_mask(u_idx, i_idx, kcore)
    u_idx, i_idx, times = u_idx[keep], i_idx[keep], times[keep]
    if len(u_idx) == 0:
        raise DataError(f"{source}: no interactions left after {kcore}-core filtering")
    # re-index users and items to dense ids in order of first appearance (file order)
    uu, u_first = np.unique(u_idx, return_index=True)
    u_order = uu[np.argsort(u_first, kind="stable")]
    u_new = np.empty(u_idx.max() + 1, dtype=np.int64)
    u_new[u_order] = np.arange(len(u_order))
    if identity_items and kcore <= 1:
        new_item_tokens = item_tokens  # BSARec ids are kept as given (unused ids stay rankable)
        i_new_ids = i_idx
    else:
        ii, i_first = np.unique(i_idx, return_index=True)
        i_order = ii[np.argsort(i_first, kind="stable")]
        i_new = np.zeros(i_idx.max() + 1, dtype=np.int64)
        i_new[i_order] = np.arange(1, len(i_order) + 1)
        new_item_tokens = [PAD_TOKEN] + [item_tokens[j] for j in i_order]
        i_new_ids = i_new[i_idx]
    u = u_new[u_idx]
    # stable chronological sort: by user, then time; equal times keep file order
    order = np.lexsort((times, u)) if has_ts else np.argsort(u, kind="stable")
    u, items, times = u[order], i_new_ids[order], times[order]
    counts = np.bincount(u, minlength=len(u_order))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return SequenceData(
        name=name,
        item_tokens=list(new_item_tokens),
        user_tokens=[user_tokens[j] for j in u_order],
        items=torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64)),
        times=torch.from_numpy(np.ascontiguousarray(times, dtype=np.float64)),
        offsets=torch.from_numpy(offsets.astype(np.int64)),
        has_timestamps=has_ts,
        source=source,
    )


def _from_atomic(path: Path, name: str, kcore: int) -> SequenceData:
    table = read_atomic(path)
    ucol = table.find_token("user_id", "user", "uid", "reviewerID")
    icol = table.find_token("item_id", "item", "iid", "asin", "parent_asin")
    tcol = table.find("timestamp", "time", "unixReviewTime")
    if ucol is None or icol is None:
        raise DataError(f"{path}: header needs user_id and item_id columns (found {', '.join(table.names)})")
    if tcol is not None and table.types[tcol] != "float":
        raise DataError(f"{path}: column {tcol} must be typed float, not {table.types[tcol]}")
    if len(table) == 0:
        raise DataError(f"{path}: no interactions")
    users = table.columns[ucol]
    items = table.columns[icol]
    user_tokens, u_idx = np.unique(np.asarray(users, dtype=object), return_inverse=True)
    item_tokens, i_idx = np.unique(np.asarray(items, dtype=object), return_inverse=True)
    has_ts = tcol is not None
    times = table.columns[tcol] if has_ts else np.zeros(len(u_idx))
    data = _build(name, str(path), u_idx.astype(np.int64), i_idx.astype(np.int64), np.asarray(times, dtype=np.float64),
                  [str(t) for t in user_tokens], [str(t) for t in item_tokens], has_ts, kcore)
    if not has_ts:
        data.times = _positions(data.offsets)
    return data


def _positions(offsets: torch.Tensor) -> torch.Tensor:
    lengths = offsets[1:] - offsets[:-1]
    total = int(offsets[-1])
    starts = torch.repeat_interleave(offsets[:-1], lengths)
    return (torch.arange(total) - starts).double()


def _txt_item_id(tok: str) -> int:
    """The id of a .txt item token: 0 unless it is ASCII digits, MAX_TXT_ITEM_ID + 1 when larger."""
    if not (tok.isascii() and tok.isdigit()):
        return 0
    digits = tok.lstrip("0")
    return int(digits or "0") if len(digits) <= len(str(MAX_TXT_ITEM_ID)) else MAX_TXT_ITEM_ID + 1


def _txt_lineno(path: Path, index: int) -> int:
    """File line of the index-th sequence of a .txt file (blank lines skipped), for error messages."""
    n = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.split():
                if n == index:
                    return lineno
                n += 1
    return 0


def _from_txt(path: Path, name: str, kcore: int) -> SequenceData:
    users, seqs = read_sequence_txt(path)
    flat: list[int] = []
    u_idx: list[int] = []
    for ui, seq in enumerate(seqs):
        for tok in seq:
            item = _txt_item_id(tok)
            if item == 0 or item > MAX_TXT_ITEM_ID:
                shown = repr(tok) if len(tok) <= 40 else f"{tok[:30]!r}... ({len(tok)} characters)"
                where = f"{path}:{_txt_lineno(path, ui)}: user {users[ui]!r} has item {shown}"
                if item == 0:
                    raise DataError(f"{where}; items must be integers >= 1 written with the digits 0-9")
                raise DataError(f"{where}; ids above {MAX_TXT_ITEM_ID:,} are not supported (BSARec ids are "
                                f"kept as given: renumber them 1..n, or `athwe data import` the file to re-index)")
            flat.append(item)
        u_idx.extend([ui] * len(seq))
    i_arr = np.asarray(flat, dtype=np.int64)
    n = int(i_arr.max())
    item_tokens = [PAD_TOKEN] + [str(i) for i in range(1, n + 1)]
    data = _build(name, str(path), np.asarray(u_idx, dtype=np.int64), i_arr, np.zeros(len(i_arr)),
                  users, item_tokens, False, kcore, identity_items=True)
    data.times = _positions(data.offsets)
    return data
