"""K-medoids pseudo-labels: ZCA whitening, CLARA-style bounded fitting, on-disk caching."""
from __future__ import annotations

import numpy as np
import torch

from athwe.models import clustering
from athwe.models.clustering import cluster_labels, kmedoids_labels, zca_whiten


def blobs(n_per: int, k: int = 4, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 20
    truth = np.repeat(np.arange(k), n_per)
    x = centres[truth] + rng.normal(size=(k * n_per, d))
    return torch.from_numpy(x), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_zca_whitening_gives_identity_covariance_and_survives_rank_deficiency():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5)) @ rng.normal(size=(5, 5)) + 3.0
    w = zca_whiten(x)
    assert torch.allclose(w.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    cov = w.t() @ w / len(w)
    assert torch.allclose(cov, torch.eye(5, dtype=torch.float64), atol=1e-6)
    # ZCA (not PCA) whitening: the whitening matrix is symmetric, so whitened data stay aligned
    centred = torch.from_numpy(x - x.mean(0))
    m = torch.linalg.lstsq(centred, w).solution
    assert torch.allclose(m, m.t(), atol=1e-6)
    low_rank = rng.normal(size=(10, 2)) @ rng.normal(size=(2, 30))  # n < d, rank 2
    assert torch.isfinite(zca_whiten(low_rank)).all()  # eigenvalues clamped at 1e-5


def test_kmedoids_recovers_separated_groups():
    x, truth = blobs(40)
    labels = kmedoids_labels(x, 4, seed=0)
    assert labels.shape == (160,) and same_partition(labels, truth)
    few = kmedoids_labels(x[:3], 10, seed=0)  # more clusters than items: one cluster per item
    assert sorted(few.tolist()) == [0, 1, 2]


def test_large_catalogues_fit_on_bounded_samples(monkeypatch):
    x, truth = blobs(500, seed=1)  # 2000 items, fitted on samples of 300
    sizes = []
    real = clustering.fit_kmedoids

    def spy(sample, k, seed):
        sizes.append(len(sample))
        return real(sample, k, seed)

    monkeypatch.setattr(clustering, "fit_kmedoids", spy)
    labels = kmedoids_labels(x, 4, seed=0, sample_size=300, draws=2)
    assert sizes == [300, 300]  # never an N x N matrix
    assert same_partition(labels, truth)


def test_labels_skip_padding_and_missing_items_and_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ATHWE_CACHE_DIR", str(tmp_path))
    x, truth = blobs(20)
    table = torch.cat([torch.zeros(1, x.shape[1]), x]).float()  # row 0 = padding
    mask = torch.ones(len(table), dtype=torch.bool)
    mask[[5, 17]] = False
    calls = []
    real = clustering.fit_kmedoids

    def spy(sample, k, seed):
        calls.append(len(sample))
        return real(sample, k, seed)

    monkeypatch.setattr(clustering, "fit_kmedoids", spy)
    first = cluster_labels(table, mask, 4, seed=3, fingerprint="fp1", modality="text")
    assert calls == [len(table) - 3]
    assert first[0] == -1 and first[5] == -1 and first[17] == -1
    keep = mask.clone()
    keep[0] = False
    assert same_partition(first[keep].numpy(), truth[keep[1:].numpy()])
    assert list((tmp_path / "clusters").glob("text-*.pt"))
    again = cluster_labels(table, mask, 4, seed=3, fingerprint="fp1", modality="text")
    assert calls == [len(table) - 3] and torch.equal(again, first)  # second call: from the cache
    cluster_labels(table, mask, 4, seed=4, fingerprint="fp1", modality="text")
    cluster_labels(table, mask, 4, seed=3, fingerprint="fp2", modality="text")
    cluster_labels(table, mask, 3, seed=3, fingerprint="fp1", modality="text")
    assert len(calls) == 4  # seed, fingerprint and cluster count are part of the key


def test_model_reuses_cached_labels(monkeypatch):
    from athwe.models import create_model
    from conftest import random_features

    calls = []
    real = clustering.fit_kmedoids
    monkeypatch.setattr(clustering, "fit_kmedoids", lambda s, k, seed: calls.append(k) or real(s, k, seed))
    args = {"hidden_size": 16, "inner_size": 32, "num_layers": 1, "n_clusters": 4}
    for _ in range(2):
        model = create_model("athwe", 30, 8, args, features=random_features(30))
        model.prepare(None)
        assert model.text_labels.shape == (31,) and model.image_labels.shape == (31,)
    assert calls == [4, 4]  # text and image once, then reused by the second model
