"""Build, save, load and search FAISS inner-product indexes for a run, and recommend from them.

A model's scores are query_vectors @ item_vectors.T (the model contract), so an exact
inner-product index over item_vectors returns exactly the model's full-scoring top-k. Approximate
indexes (HNSW, IVF-PQ) trade a little recall for latency on large catalogues. Padding (row 0) is
never indexed; FAISS ids are internal item ids.

Files in the run folder: ``index.faiss`` and ``index.json`` (kind, knobs, dimensions, the item-map
fingerprint and a fingerprint of the checkpoint the vectors came from), both written atomically.

`Retriever` answers for a known user or for any history of item tokens (with timestamps where the
model reads them), many requests in one model pass and one index search. Items added from their
content (new_items.py) join the in-memory index under ids after the trained ones; the index file
stays the trained one.
"""
from __future__ import annotations

import json
import math
import numbers
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from athwe import runs
from athwe.dataset.atomic import read_atomic
from athwe.dataset.split import Batch
from athwe.errors import AthweError, UnknownTokenError
from athwe.models.athwe import fingerprint_text
from athwe.retrieval import new_items
from athwe.utils import atomic_path, atomic_write_json, hash_file, read_json

INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
#: how new items get the ID part of their vectors (Retriever(id_part=...))
ID_PARTS = ("content", "mean")
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


def add_to_index(index: Any, vectors: np.ndarray, first_id: int) -> None:
    """Add item vectors under ids first_id, first_id + 1, ... to an index built by `build_index`
    (an IndexIDMap over a flat, HNSW or refined IVF-PQ index; all of them take new vectors)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index.add_with_ids(x, np.arange(first_id, first_id + len(x), dtype=np.int64))


@dataclass
class Recommendation:
    rank: int
    item_id: int
    item: str
    title: str | None
    score: float


@dataclass
class Request:
    """One recommendation request: a known `user` (their whole known history), or `items`, a
    history of item tokens oldest first, with `timestamps` (unix seconds, one per item) where the
    model reads them. `exclude` items are never returned; `exclude_history` drops the history's."""

    user: str | None = None
    items: Sequence[str] | None = None
    timestamps: Sequence[float] | None = None
    k: int = 10
    exclude: Sequence[str] = ()
    exclude_history: bool = True


@dataclass
class _Query:
    """A checked request: the history's item ids and timestamps (oldest first), how many items to
    return, and the ids never to return."""

    ids: np.ndarray
    times: np.ndarray
    k: int
    drop: set[int]
    user: int = -1


class Retriever:
    """Top-k recommendations from a run, through its index: for a known user, or for any history of
    item tokens (trained items and items added from their content). Model passes and additions are
    serialised by a lock, so a server may call it from worker threads."""

    def __init__(self, run_dir: str | Path, id_part: str = "content"):
        """`id_part`: how new items added here get their ID rows, "content" (predicted from their
        content, new_items.content_id_rows) or "mean" (the mean trained ID embedding)."""
        if id_part not in ID_PARTS:
            raise AthweError(f"--id-part must be one of {', '.join(ID_PARTS)}, got {id_part!r}")
        self.id_part = id_part
        self.run = Path(run_dir)
        self.model, self.data, self.cfg = runs.load_run_model(self.run)
        self.index, self.meta = load_run_index(self.run, self.data.item_fingerprint)
        self.user_index = {tok: i for i, tok in enumerate(self.data.user_tokens)}
        self.dataset_dir = Path(self.cfg.data.data_dir) / self.cfg.data.dataset
        self.titles, self.categories, self.item_columns = item_metadata(self.dataset_dir, self.data.item_tokens)
        self.tokens = list(self.data.item_tokens)  # id -> token, trained items then added ones
        self.token_index = {tok: i for i, tok in enumerate(self.tokens) if i > 0}
        self.additions: list[dict[str, Any]] = []  # one summary per addition file, in order
        self._lock = threading.Lock()  # model passes, index searches and table changes
        self._add_lock = threading.Lock()  # one addition at a time (embedding included)
        self._content: new_items.ContentEncoder | None = None
        self._load_additions()

    # -- what the run holds --------------------------------------------------------------------------
    @property
    def n_catalogue(self) -> int:
        """Items that can be recommended: trained plus added."""
        return len(self.tokens) - 1

    def fingerprints(self) -> dict[str, str | None]:
        """The item-map, checkpoint and feature fingerprints additions are recorded against."""
        fp = getattr(self.model, "feature_fingerprint", None)
        return {"item_fingerprint": self.data.item_fingerprint,
                "checkpoint_fingerprint": self.meta["checkpoint_fingerprint"],
                "feature_fingerprint": (fingerprint_text(fp) or None) if isinstance(fp, torch.Tensor) else None}

    def info(self) -> dict[str, Any]:
        """The run, model, catalogue and index being used."""
        return {"run": str(self.run), "model": self.cfg.model, "dataset": self.cfg.data.dataset,
                "trained_items": self.data.n_items, "added_items": self.n_catalogue - self.data.n_items,
                "users": self.data.n_users, "max_seq_length": self.cfg.data.max_seq_length,
                "uses_timestamps": bool(self.model.uses_timestamps),
                "accepts_new_items": new_items.refusal(self.model, self.cfg.model) is None,
                **self.fingerprints(), "index_kind": self.meta["kind"], "index_items": int(self.index.ntotal)}

    def item(self, token: str) -> dict[str, Any]:
        """One catalogue item: token, id, title, whether it was added, and its categories if known."""
        i = self._item_id(token, "")
        out: dict[str, Any] = {"token": token, "id": i, "title": self.titles.get(i), "added": i > self.data.n_items}
        if self.categories.get(i):
            out["categories"] = list(self.categories[i])
        return out

    def _item_id(self, token: Any, where: str) -> int:
        if not isinstance(token, str):
            raise AthweError(f"item tokens{where} must be strings, got {token!r}")
        i = self.token_index.get(token)
        if i is None:
            added = self.n_catalogue - self.data.n_items
            known = f"{self.data.n_items:,} trained" + (f" or {added:,} added" if added else "")
            raise UnknownTokenError(f"unknown item {token!r}{where} (not one of the run's {known} items)")
        return i

    def resolve_user(self, user: str) -> int:
        if user not in self.user_index:
            examples = ", ".join(self.data.user_tokens[:3])
            raise UnknownTokenError(f"unknown user {user!r} in dataset {self.cfg.data.dataset} "
                             f"({self.data.n_users} users, e.g. {examples})")
        return self.user_index[user]

    def history(self, u: int) -> np.ndarray:
        return self.data.items[int(self.data.offsets[u]):int(self.data.offsets[u + 1])].numpy()

    # -- recommendations -----------------------------------------------------------------------------
    def recommend(self, user: str | None = None, *, items: Sequence[str] | None = None,
                  timestamps: Sequence[float] | None = None, k: int = 10, exclude: Sequence[str] = (),
                  exclude_history: bool = True) -> list[Recommendation]:
        """Top-k for a known user (their whole known history) or for `items`, a history of item
        tokens oldest first (see Request)."""
        return self.recommend_batch([Request(user, items, timestamps, k, exclude, exclude_history)])[0]

    def recommend_batch(self, requests: Sequence[Request]) -> list[list[Recommendation]]:
        """Every request's top-k from one model pass and one index search; an invalid request is an
        AthweError naming it (by position when there are several)."""
        queries = []
        for pos, req in enumerate(requests, 1):
            try:
                queries.append(self._check_request(req))
            except AthweError as e:
                raise (type(e)(f"request {pos}: {e}") if len(requests) > 1 else e) from None
        return self._answer(queries)

    def search(self, users: list[int], k: int = 10, exclude_history: bool = True) -> list[list[Recommendation]]:
        """Top-k for users given by their internal index (0..n_users-1)."""
        self._check_k(k)
        return self._answer([self._user_query(u, k, exclude_history) for u in users])

    def user_batch(self, users: list[int]) -> Batch:
        """Left-padded batches of each user's full known history (last N items)."""
        return self._batch([self._user_query(u, 1, False) for u in users])

    def write_all(self, out: str | Path, k: int = 10, exclude_history: bool = True, batch_size: int = 1024) -> int:
        """Top-k for every user as JSON lines {user, items, scores}, written atomically."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise AthweError(f"--batch-size must be at least 1, got {batch_size}")
        self._check_k(k)
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for start in tqdm(range(0, self.data.n_users, batch_size), desc="users", unit="batch", disable=None):
                users = list(range(start, min(start + batch_size, self.data.n_users)))
                for u, recs in zip(users, self.search(users, k, exclude_history)):
                    f.write(json.dumps({"user": self.data.user_tokens[u], "items": [r.item for r in recs],
                                        "scores": [round(r.score, 6) for r in recs]}) + "\n")
        return self.data.n_users

    def _check_k(self, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise AthweError(f"-k must be a whole number, got {k!r}")
        if k < 1:
            raise AthweError(f"-k must be at least 1, got {k}")
        if k > self.n_catalogue:
            raise AthweError(f"-k {k:,} is more than the {self.n_catalogue:,} items of the catalogue")

    def _user_query(self, u: int, k: int, exclude_history: bool) -> _Query:
        a, b = int(self.data.offsets[u]), int(self.data.offsets[u + 1])
        ids = self.data.items[a:b].numpy()
        return _Query(ids, self.data.times[a:b].numpy(), int(k), set(ids.tolist()) if exclude_history else set(), u)

    def _check_request(self, req: Request) -> _Query:
        """A request's history, timestamps, k and exclusions, checked (one-line AthweErrors)."""
        if (req.user is None) == (req.items is None):
            raise AthweError("pass exactly one of user (a known user) or items (a history of item tokens)")
        self._check_k(req.k)
        if isinstance(req.exclude, str):
            raise AthweError("exclude must be a list of item tokens, not one string")
        drop = {self._item_id(tok, " in exclude") for tok in req.exclude}
        if req.user is not None:
            if req.timestamps is not None:
                raise AthweError("timestamps go with items (a known user's come from the dataset)")
            query = self._user_query(self.resolve_user(req.user), req.k, req.exclude_history)
            query.drop |= drop
            return query
        if isinstance(req.items, str):
            raise AthweError("items must be a list of item tokens (oldest first), not one string")
        tokens = list(req.items)  # type: ignore[arg-type]
        if not tokens:
            raise AthweError("items is empty: pass at least one item token (oldest first)")
        ids = np.array([self._item_id(tok, " in items") for tok in tokens], dtype=np.int64)
        times = self._check_timestamps(req.timestamps, len(ids))
        return _Query(ids, times, int(req.k), drop | (set(ids.tolist()) if req.exclude_history else set()))

    def _check_timestamps(self, timestamps: Sequence[float] | None, n: int) -> np.ndarray:
        """Unix seconds, one per item, finite and non-decreasing; zeros when absent and the model
        does not read them."""
        if timestamps is None:
            if self.model.uses_timestamps:
                raise AthweError(f"timestamps are required: this run's {self.cfg.model} model reads the time between "
                                 f"items (pass one unix time in seconds per item, oldest first)")
            return np.zeros(n, dtype=np.float64)
        if isinstance(timestamps, (str, bytes)) or len(timestamps) != n:
            got = ("one string" if isinstance(timestamps, (str, bytes))
                   else f"{len(timestamps)} value{'s' * (len(timestamps) != 1)}")
            raise AthweError(f"timestamps: {got} for {n} item{'s' * (n != 1)} (one unix time in seconds per item)")
        for pos, t in enumerate(timestamps, 1):
            if isinstance(t, bool) or not isinstance(t, numbers.Real):
                raise AthweError(f"timestamps: value {pos} ({t!r}) is not a number")
            if not math.isfinite(t):
                raise AthweError(f"timestamps: value {pos} ({t!r}) is not a finite number")
        times = np.asarray(timestamps, dtype=np.float64)
        back = np.nonzero(np.diff(times) < 0)[0]
        if len(back):
            i = int(back[0])
            raise AthweError(f"timestamps must not decrease (items oldest first): value {i + 2} ({times[i + 1]:g}) "
                             f"is before value {i + 1} ({times[i]:g})")
        return times

    def _batch(self, queries: list[_Query]) -> Batch:
        """The last max_seq_length items of each history, left-padded with id 0 and timestamp 0."""
        n = self.cfg.data.max_seq_length
        ids = torch.zeros(len(queries), n, dtype=torch.long)
        ts = torch.zeros(len(queries), n, dtype=torch.float64)
        for row, q in enumerate(queries):
            seq, t = q.ids[-n:], q.times[-n:]
            ids[row, n - len(seq):] = torch.from_numpy(np.ascontiguousarray(seq, dtype=np.int64))
            ts[row, n - len(seq):] = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64))
        return Batch(ids, ts, torch.zeros(len(queries), dtype=torch.long), torch.tensor([q.user for q in queries]),
                     ts[:, -1])

    def _answer(self, queries: list[_Query]) -> list[list[Recommendation]]:
        """One model pass and one index search for all queries (k enlarged by the most items any of
        them excludes), then each query's top k without its excluded items."""
        if not queries:
            return []
        batch = self._batch(queries)
        device = next(self.model.parameters()).device
        with self._lock:
            with torch.inference_mode():
                q = self.model.query_vectors(batch.to(device)).float().cpu().numpy()
            wanted = min(max(x.k + len(x.drop) for x in queries), int(self.index.ntotal))
            scores, ids = search_index(self.index, np.ascontiguousarray(q), wanted)
        out = []
        for row, query in enumerate(queries):
            recs: list[Recommendation] = []
            for s, i in zip(scores[row], ids[row]):
                i = int(i)
                if i < 1 or i in query.drop:
                    continue
                recs.append(Recommendation(len(recs) + 1, i, self.tokens[i], self.titles.get(i), float(s)))
                if len(recs) == query.k:
                    break
            out.append(recs)
        return out

    # -- new items ------------------------------------------------------------------------------------
    def add_items(self, records: Sequence[Mapping[str, Any] | new_items.NewItem]) -> list[str]:
        """Add items from their content (dicts with the fields `athwe data import` writes, or
        NewItems from `new_items.read_new_items`): embedded as the dataset's features were, recorded
        beside the run, and recommendable at once. Returns their tokens (ids follow the catalogue's)."""
        reason = new_items.refusal(self.model, self.cfg.model)
        if reason is not None:
            raise AthweError(reason)
        items = [r if isinstance(r, new_items.NewItem) else new_items.parse_record(r, f"record {pos}")
                 for pos, r in enumerate(records, 1)]
        with self._add_lock:
            new_items.check_new_tokens(items, self.token_index, self.data.n_items)
            new_items.check_local_images(items)
            content = self._content_encoder()
            inputs = content.plan(items, set(getattr(self.model, "missing", {})))
            with tempfile.TemporaryDirectory(prefix="athwe-new-items-") as scratch:
                raw = content.embed(items, inputs, Path(scratch))
            n = self.data.n_items
            id_rows = (new_items.content_id_rows(self.model, n, raw.raw, raw.has) if self.id_part == "content"
                       else new_items.mean_id_rows(self.model, n, len(items)))
            self._commit(items, id_rows, raw)
        return [it.token for it in items]

    def _content_encoder(self) -> new_items.ContentEncoder:
        if self._content is None:
            mods = new_items.content_modalities(self.model)
            dims = {m: int(getattr(self.model, f"{m}_raw").shape[1]) for m in mods}
            device = next(self.model.parameters()).device
            self._content = new_items.ContentEncoder(self.dataset_dir, mods, dims, self.item_columns, device)
        return self._content

    def _commit(self, items: list[new_items.NewItem], id_rows: torch.Tensor | None,
                content: new_items.Content) -> None:
        """Extend the model's tables, record the addition on disk, then index it; the model is put
        back as it was if anything fails before the record is complete."""
        fps = self.fingerprints()
        with self._lock, new_items.run_lock(self.run):
            on_disk = len(new_items.addition_files(self.run))
            if on_disk != len(self.additions):
                raise AthweError(f"{self.run}: items were added by another process since this run was loaded "
                                 f"({on_disk} additions on disk, {len(self.additions)} loaded); load the run again")
            new_items.check_new_tokens(items, self.token_index, self.data.n_items)
            first = self.n_catalogue + 1
            restore, saved = new_items.restore_point(self.model), None
            try:
                self.model.append_items(id_rows, content.raw, content.has)
                vectors = self._vectors_from(first)
                record = new_items.make_record(items, first, id_rows, content, torch.from_numpy(vectors), fps)
                saved = new_items.save_record(self.run, record, len(self.additions) + 1)
                new_items.write_listing(self.run, self.additions + [new_items.summary(record, saved)], fps)
            except BaseException:
                if saved is not None:
                    saved.unlink(missing_ok=True)
                restore()
                raise
            self._register(record, saved)
            add_to_index(self.index, vectors, first)

    def _vectors_from(self, first: int) -> np.ndarray:
        with torch.inference_mode():
            return self.model.item_vectors()[first:].float().cpu().numpy()

    def _register(self, record: dict[str, Any], path: Path) -> None:
        first = record["first_id"]
        for j, tok in enumerate(record["tokens"]):
            self.tokens.append(tok)
            self.token_index[tok] = first + j
            if record["titles"][j]:
                self.titles[first + j] = record["titles"][j]
            if record["categories"][j]:
                self.categories[first + j] = list(record["categories"][j])
        self.additions.append(new_items.summary(record, path))

    def _load_additions(self) -> None:
        """Recorded additions join the model's tables and the in-memory index (the file stays the
        trained one); one made for another checkpoint or features, or damaged, is refused."""
        loaded = new_items.load_records(self.run, self.fingerprints(), self.data.n_items)
        if not loaded:
            return
        reason = new_items.refusal(self.model, self.cfg.model)
        if reason is not None:
            raise AthweError(f"{self.run / new_items.ADDED_DIR}: {reason}")
        first = self.n_catalogue + 1
        for path, rec in loaded:
            try:
                self.model.append_items(rec["id_rows"], rec["raw"], rec["has"])
            except ValueError as e:
                raise AthweError(f"{path}: does not fit the run's model ({e})") from None
        vectors = self._vectors_from(first)
        for path, rec in loaded:
            at = rec["first_id"] - first
            mine = vectors[at:at + len(rec["tokens"])]
            if mine.shape != tuple(rec["vectors"].shape) or not np.allclose(mine, rec["vectors"].numpy(),
                                                                            rtol=1e-3, atol=1e-4):
                raise AthweError(f"{path}: its vectors differ from what the run's model computes from its features; "
                                 f"move {path.parent} away and add the items again")
        add_to_index(self.index, vectors, first)
        for path, rec in loaded:
            self._register(rec, path)


def item_metadata(dataset_dir: Path, item_tokens: list[str]) -> tuple[dict[int, str], dict[int, list[str]],
                                                                      dict[str, str]]:
    """Item id -> title and id -> categories from `<name>.item` when the dataset has one (title /
    movie_title / name, categories / category / genre columns), and its columns (name -> type,
    the id column left out)."""
    path = dataset_dir / f"{dataset_dir.name}.item"
    if not path.is_file():
        return {}, {}, {}
    table = read_atomic(path)
    icol = table.find("item_id", "item", "iid")
    if icol is None:
        return {}, {}, {}
    columns = {c: table.types[c] for c in table.names if c != icol}
    pos = {tok: i for i, tok in enumerate(item_tokens)}
    titles: dict[int, str] = {}
    categories: dict[int, list[str]] = {}
    for key, out in ((table.find("title", "movie_title", "name"), titles),
                     (table.find("categories", "category", "class", "genre", "genres"), categories)):
        if key is None:
            continue
        for tok, value in zip(table.columns[icol], table.columns[key]):
            if tok in pos and pos[tok] not in out:
                words = [str(v) for v in value] if isinstance(value, (list, np.ndarray)) else [str(value)]
                out[pos[tok]] = " ".join(words) if out is titles else [w for w in words if w]
    return titles, categories, columns


def item_titles(dataset_dir: Path, item_tokens: list[str]) -> dict[int, str]:
    """Item id -> title from `<name>.item` when the dataset has one (title / movie_title column)."""
    return item_metadata(dataset_dir, item_tokens)[0]
