"""Build, save, load and search FAISS inner-product indexes for a run.

A model's scores are query_vectors @ item_vectors.T (the model contract), so an exact
inner-product index over item_vectors returns exactly the model's full-scoring top-k. Approximate
indexes (HNSW, IVF-PQ) trade a little recall for latency on large catalogues. Padding (row 0) is
never indexed; FAISS ids are internal item ids.

Files in the run folder: ``index.faiss`` and ``index.json`` (kind, knobs, dimensions, the item-map
fingerprint and a fingerprint of the checkpoint the vectors came from), both written atomically.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from athwe import runs
from athwe.dataset.atomic import read_atomic
from athwe.dataset.split import Batch
from athwe.errors import AthweError
from athwe.utils import atomic_path, atomic_write_json, hash_file, read_json

INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
#: up to this many items `auto` picks the exact index, above it IVF-PQ with exact re-ranking
#: (benchmarks/README.md, retrieval: where exact search stops paying off)
EXACT_MAX_ITEMS = 100_000


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise AthweError("faiss is not installed (pip install faiss-cpu)") from e
    return faiss


def file_fingerprint(path: Path) -> str:
    return hash_file(path).hexdigest()[:16]


def _check_knobs(kind: str, n: int, d: int, *, hnsw_m: int, ef_construction: int, ef_search: int,
                 nlist: int | None, pq_m: int | None, nprobe: int, refine: int, train_points: int) -> None:
    """Reject settings FAISS would abort on (or assert in C++) with a one-line error naming the option."""
    if n < 1:
        raise AthweError("no item vectors to index")
    if kind == "hnsw":
        if hnsw_m < 2:
            raise AthweError(f"--hnsw-m must be at least 2, got {hnsw_m}")
        if ef_construction < 1 or ef_search < 1:
            raise AthweError(f"--ef-construction and --ef-search must be at least 1, "
                             f"got {ef_construction} and {ef_search}")
    if kind == "ivfpq":
        if nlist is not None and not 1 <= nlist <= train_points:
            raise AthweError(f"--nlist must be between 1 and the {train_points:,} training vectors, got {nlist}")
        if pq_m is not None and pq_m < 1:
            raise AthweError(f"--pq-m must be at least 1, got {pq_m}")
        if nprobe < 1 or refine < 0:
            raise AthweError(f"--nprobe must be at least 1 and --refine at least 0, got {nprobe} and {refine}")
        if train_points < 256:
            raise AthweError(f"ivfpq trains 256-entry codebooks and needs at least 256 items; "
                             f"this catalogue has {n:,} (use --kind flat or hnsw)")


def build_index(vectors: np.ndarray, kind: str = "auto", hnsw_m: int = 32, ef_construction: int = 200,
                ef_search: int = 128, nlist: int | None = None, pq_m: int | None = None, nprobe: int = 32,
                refine: int = 10, train_size: int = 100_000, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An inner-product index over `vectors` (n, D), whose row j gets FAISS id j + 1 (item id)."""
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise AthweError(f"unknown index kind {kind!r} (one of {', '.join(INDEX_KINDS)})")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX_ITEMS else "ivfpq"
    knobs: dict[str, Any] = {}
    _check_knobs(kind, n, d, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist,
                 pq_m=pq_m, nprobe=nprobe, refine=refine, train_points=min(n, train_size))
    if kind == "flat":
        base = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = ef_construction
        base.hnsw.efSearch = ef_search
        knobs = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    else:
        # ~4 sqrt(n) lists, capped so k-means gets >= 39 training points per centroid
        nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n)), min(n, train_size) // 39))
        pq_m = pq_m or max(1, d // 2)
        if d % pq_m:
            raise AthweError(f"--pq-m {pq_m} must divide the vector width {d}")
        quantizer = faiss.IndexFlatIP(d)
        base = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= train_size else x[rng.choice(n, train_size, replace=False)]
        base.train(sample)
        base.nprobe = nprobe
        knobs = {"nlist": nlist, "pq_m": pq_m, "nprobe": nprobe, "refine": refine}
        if refine > 0:  # re-rank refine*k PQ candidates with exact inner products
            base = faiss.IndexRefineFlat(base)
            base.k_factor = float(refine)
    index = faiss.IndexIDMap(base)
    index.add_with_ids(x, np.arange(1, n + 1, dtype=np.int64))
    return index, {"kind": kind, **knobs, "n_items": n, "dim": d}


def set_search_knobs(index: Any, ef_search: int | None = None, nprobe: int | None = None) -> None:
    faiss = _faiss()
    base = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(base, faiss.IndexRefine):
        base = faiss.downcast_index(base.base_index)
    if ef_search is not None and hasattr(base, "hnsw"):
        base.hnsw.efSearch = ef_search
    if nprobe is not None and hasattr(base, "nprobe"):
        base.nprobe = nprobe


def search_index(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search, on one thread for a single query: FAISS parallelises over queries, so extra
    OpenMP threads only add wake-up latency to one user's search."""
    faiss = _faiss()
    if len(queries) > 1:
        return index.search(queries, k)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(threads)


def write_run_index(run_dir: str | Path, model: Any, item_fingerprint: str, kind: str = "auto",
                    **knobs: Any) -> dict[str, Any]:
    """Index a model's item vectors (the run's best weights) and save it in the run folder."""
    run = Path(run_dir)
    with torch.inference_mode():
        vectors = model.item_vectors()[1:].float().cpu().numpy()
    t0 = time.perf_counter()
    index, meta = build_index(vectors, kind, **knobs)
    meta.update({"build_seconds": round(time.perf_counter() - t0, 3), "item_fingerprint": item_fingerprint,
                 "checkpoint_fingerprint": file_fingerprint(run / runs.BEST), "model": model.__class__.__name__})
    faiss = _faiss()
    with atomic_path(run / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_json(run / "index.json", meta)
    return meta


def build_run_index(run_dir: str | Path, kind: str = "auto", **knobs: Any) -> dict[str, Any]:
    """Build the index of a finished run from its best checkpoint."""
    model, data, _ = runs.load_run_model(run_dir)
    return write_run_index(run_dir, model, data.item_fingerprint, kind, **knobs)


def load_run_index(run_dir: str | Path, item_fingerprint: str) -> tuple[Any, dict[str, Any]]:
    """Load a run's index, refusing one built for another item map or checkpoint."""
    run = Path(run_dir)
    meta_path, index_path = run / "index.json", run / "index.faiss"
    if not meta_path.is_file() or not index_path.is_file():
        raise AthweError(f"{run}: no index (build it with `athwe index --run {run}`)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not {"item_fingerprint", "checkpoint_fingerprint"} <= meta.keys():
        raise AthweError(f"{meta_path}: not an index description; rebuild with `athwe index --run {run}`")
    if meta["item_fingerprint"] != item_fingerprint:
        raise AthweError(f"{index_path}: built for item map {meta['item_fingerprint']}, "
                         f"but the run's data has {item_fingerprint}")
    if meta["checkpoint_fingerprint"] != file_fingerprint(run / "best.pt"):
        raise AthweError(f"{index_path}: built from another checkpoint than {run / 'best.pt'}; "
                         f"rebuild with `athwe index --run {run}`")
    try:
        index = _faiss().read_index(str(index_path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].split(": ", 1)[-1] if str(e).strip() else "unreadable"
        raise AthweError(f"{index_path}: not a readable FAISS index ({reason}); "
                         f"rebuild with `athwe index --run {run}`") from None
    return index, meta


@dataclass
class Recommendation:
    rank: int
    item_id: int
    item: str
    title: str | None
    score: float


class Retriever:
    """Top-k recommendations for users of a run's dataset, through the run's index."""

    def __init__(self, run_dir: str | Path):
        self.run = Path(run_dir)
        self.model, self.data, self.cfg = runs.load_run_model(self.run)
        self.index, self.meta = load_run_index(self.run, self.data.item_fingerprint)
        self.user_index = {tok: i for i, tok in enumerate(self.data.user_tokens)}
        self.titles = item_titles(Path(self.cfg.data.data_dir) / self.cfg.data.dataset, self.data.item_tokens)

    def user_batch(self, users: list[int]):
        """Left-padded batches of each user's full known history (last N items)."""
        n = self.cfg.data.max_seq_length
        ids = torch.zeros(len(users), n, dtype=torch.long)
        ts = torch.zeros(len(users), n, dtype=torch.float64)
        for row, u in enumerate(users):
            a, b = int(self.data.offsets[u]), int(self.data.offsets[u + 1])
            seq, t = self.data.items[a:b][-n:], self.data.times[a:b][-n:]
            ids[row, n - len(seq):] = seq
            ts[row, n - len(seq):] = t
        last = ts[:, -1]
        return Batch(ids, ts, torch.zeros(len(users), dtype=torch.long), torch.tensor(users), last)

    def history(self, u: int) -> np.ndarray:
        return self.data.items[int(self.data.offsets[u]):int(self.data.offsets[u + 1])].numpy()

    def resolve_user(self, user: str) -> int:
        if user not in self.user_index:
            examples = ", ".join(self.data.user_tokens[:3])
            raise AthweError(f"unknown user {user!r} in dataset {self.cfg.data.dataset} "
                             f"({self.data.n_users} users, e.g. {examples})")
        return self.user_index[user]

    def search(self, users: list[int], k: int = 10, exclude_history: bool = True) -> list[list[Recommendation]]:
        if k < 1:
            raise AthweError(f"-k must be at least 1, got {k}")
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            q = self.model.query_vectors(self.user_batch(users).to(device)).float().cpu().numpy()
        hist = [self.history(u) for u in users]
        extra = max((len(np.unique(h)) for h in hist), default=0) if exclude_history else 0
        scores, ids = search_index(self.index, np.ascontiguousarray(q), k + extra)
        out = []
        for row, u in enumerate(users):
            seen = set(hist[row].tolist()) if exclude_history else set()
            recs = []
            for s, i in zip(scores[row], ids[row]):
                if i < 1 or int(i) in seen:
                    continue
                recs.append(Recommendation(len(recs) + 1, int(i), self.data.item_tokens[i], self.titles.get(int(i)),
                                           float(s)))
                if len(recs) == k:
                    break
            out.append(recs)
        return out

    def write_all(self, out: str | Path, k: int = 10, exclude_history: bool = True, batch_size: int = 1024) -> int:
        """Top-k for every user as JSON lines {user, items, scores}, written atomically."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise AthweError(f"--batch-size must be at least 1, got {batch_size}")
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for start in tqdm(range(0, self.data.n_users, batch_size), desc="users", unit="batch", disable=None):
                users = list(range(start, min(start + batch_size, self.data.n_users)))
                for u, recs in zip(users, self.search(users, k, exclude_history)):
                    f.write(json.dumps({"user": self.data.user_tokens[u], "items": [r.item for r in recs],
                                        "scores": [round(r.score, 6) for r in recs]}) + "\n")
        return self.data.n_users

    def recommend(self, user: str, k: int = 10, exclude_history: bool = True) -> list[Recommendation]:
        return self.search([self.resolve_user(user)], k, exclude_history)[0]


def item_titles(dataset_dir: Path, item_tokens: list[str]) -> dict[int, str]:
    """Item id -> title from `<name>.item` when the dataset has one (title / movie_title column)."""
    path = dataset_dir / f"{dataset_dir.name}.item"
    if not path.is_file():
        return {}
    table = read_atomic(path)
    icol = table.find("item_id", "item", "iid")
    tcol = table.find("title", "movie_title", "name")
    if icol is None or tcol is None:
        return {}
    pos = {tok: i for i, tok in enumerate(item_tokens)}
    out = {}
    for tok, title in zip(table.columns[icol], table.columns[tcol]):
        if tok in pos:
            out[pos[tok]] = " ".join(title) if isinstance(title, list) else str(title)
    return out
