"""K-medoids pseudo-labels on ZCA-whitened item features (ATHWE's cluster loss targets).

The reference runs scikit-learn-extra K-medoids on all items, which builds a dense N x N distance
matrix (about 6 GB for 28k items) and recomputes it on every run. Here:

- whitening: ZCA from the covariance eigendecomposition, eigenvalues clamped at 1e-5 (float64);
- fitting: FasterPAM (python-kmedoids) on at most ``sample_size`` items; a larger catalogue is
  handled CLARA-style (several random samples, each fitted and scored on the whole catalogue,
  the cheapest kept), and every item is assigned to its nearest medoid in chunks, so memory stays
  O(sample_size^2 + chunk * k);
- caching: labels are stored under ``<cache>/clusters/`` keyed on the feature fingerprint, the
  modality, the cluster count, the seed and the sample size, and reused by later runs.

Items without a feature (mask False) and the padding row 0 are never clustered: label -1.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from athwe.errors import AthweError
from athwe.utils import atomic_torch_save

CACHE_VERSION = 1
EIG_FLOOR = 1e-5


def zca_whiten(x: np.ndarray | torch.Tensor, eps: float = EIG_FLOOR) -> torch.Tensor:
    """ZCA-whitened rows of x (n, d): (x - mean) U diag(max(lambda, eps)^-1/2) U^T, float64."""
    e = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if e.ndim != 2 or e.shape[0] == 0:
        raise AthweError(f"zca_whiten: expected a non-empty (n, d) matrix, got shape {tuple(e.shape)}")
    centred = e - e.mean(0, keepdim=True)
    cov = centred.t() @ centred / e.shape[0]
    values, vectors = torch.linalg.eigh(cov)
    w = (vectors * values.clamp(min=eps).rsqrt()) @ vectors.t()
    return centred @ w


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64."""
    return torch.cdist(a, b).clamp_(min=0.0)


def fit_kmedoids(x: torch.Tensor, n_clusters: int, seed: int) -> np.ndarray:
    """Indices of n_clusters medoids of the rows of x, by FasterPAM on their distance matrix."""
    import kmedoids

    diss = _pairwise(x, x).numpy()
    result = kmedoids.fasterpam(diss, n_clusters, max_iter=100, init="random", random_state=seed, n_cpu=1)
    return np.asarray(result.medoids, dtype=np.int64)


def assign(x: torch.Tensor, medoids: torch.Tensor, chunk: int = 8192) -> tuple[np.ndarray, float]:
    """Nearest-medoid label of every row of x (chunked) and the total distance to it."""
    labels = np.empty(len(x), dtype=np.int64)
    cost = 0.0
    for start in range(0, len(x), chunk):
        d = _pairwise(x[start:start + chunk], medoids)
        best, idx = d.min(1)
        labels[start:start + chunk] = idx.numpy()
        cost += float(best.sum())
    return labels, cost


def kmedoids_labels(x: np.ndarray | torch.Tensor, n_clusters: int, seed: int = 0, sample_size: int = 4000,
                    draws: int = 3) -> np.ndarray:
    """Cluster ids in [0, k) for the rows of x, k = min(n_clusters, n). At most `sample_size`
    rows are fitted at once; above that, `draws` random samples are fitted (CLARA) and the
    medoids with the lowest total distance over all rows win."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    n = len(x)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    k = max(1, min(n_clusters, n))
    if n <= sample_size:
        medoids = fit_kmedoids(x, k, seed)
        return assign(x, x[torch.from_numpy(medoids)])[0]
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for draw in range(max(1, draws)):
        sample = np.sort(rng.choice(n, size=sample_size, replace=False))
        medoids = sample[fit_kmedoids(x[torch.from_numpy(sample)], k, seed + draw)]
        labels, cost = assign(x, x[torch.from_numpy(medoids)])
        if best is None or cost < best[0]:
            best = (cost, labels)
    assert best is not None
    return best[1]


def content_fingerprint(features: torch.Tensor, mask: torch.Tensor | None) -> str:
    """A fingerprint of a feature matrix (and its mask) for tensors that do not come with one."""
    h = hashlib.sha256()
    arr = features.detach().to("cpu", torch.float32).contiguous().numpy()
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    if mask is not None:
        h.update(mask.detach().to("cpu", torch.bool).numpy().tobytes())
    return h.hexdigest()[:16]


def cluster_cache_dir() -> Path:
    from athwe.dataset.sequences import cache_root

    return cache_root() / "clusters"


def cluster_labels(features: torch.Tensor, mask: torch.Tensor | None, n_clusters: int, seed: int,
                   fingerprint: str | None = None, modality: str = "text", sample_size: int = 4000,
                   use_cache: bool = True) -> torch.Tensor:
    """(n_items + 1,) int64 pseudo-labels of a feature table whose row 0 is padding: K-medoids on
    the ZCA-whitened rows that have a feature, -1 for row 0 and for items without one. Cached on
    disk keyed on (fingerprint, modality, n_clusters, seed, sample_size)."""
    n_rows = features.shape[0]
    has = torch.ones(n_rows, dtype=torch.bool) if mask is None else mask.detach().to("cpu", torch.bool).clone()
    if len(has) != n_rows:
        raise AthweError(f"cluster_labels: mask has {len(has)} rows, features {n_rows}")
    has[0] = False
    fp = fingerprint or content_fingerprint(features, mask)
    key_src = json.dumps([CACHE_VERSION, fp, modality, n_rows, int(n_clusters), int(seed), int(sample_size)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cluster_cache_dir() / f"{modality}-{key}.pt"
    if use_cache and path.is_file():
        try:
            labels = torch.load(path, weights_only=True)
            if labels.shape == (n_rows,):
                return labels
        except Exception:
            pass  # an unreadable cache entry is recomputed below
    labels = torch.full((n_rows,), -1, dtype=torch.long)
    rows = torch.nonzero(has).squeeze(1)
    if len(rows):
        whitened = zca_whiten(features.detach().to("cpu")[rows])
        labels[rows] = torch.from_numpy(kmedoids_labels(whitened, n_clusters, seed, sample_size))
    if use_cache:
        try:
            atomic_torch_save(labels, path)
        except OSError:
            pass  # caching is an optimisation; a read-only cache must not fail the run
    return labels
