"""Retrieval: the exact index reproduces every model's full-scoring top-k; CLI behaviour."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from athwe.cli import app
from athwe.config import resolve_config
from athwe.dataset.sequences import load_sequences
from athwe.models import get_entry, list_models
from athwe.retrieval import Retriever, build_index, build_run_index
from athwe.training import trainer as tr
from conftest import write_random_features, write_tiny_dataset
from test_models_common import small_config


def trained_run(tmp_path, model: str, epochs: int = 1):
    data = write_tiny_dataset(tmp_path / "data")
    overrides = [f"model_args.{k}={v}" for k, v in small_config(model).items()]
    cfg = resolve_config(model, "tiny", overrides=overrides, flags={
        "data.data_dir": str(data), "data.max_seq_length": 8, "train.epochs": epochs, "data.preset": "recbole",
        "train.runs_dir": str(tmp_path / "runs")})
    if get_entry(model).needs_features:
        write_random_features(data / "tiny", load_sequences(data, "tiny", kcore=cfg.data.kcore).item_tokens)
    run, _ = tr.train(cfg, run_dir=tmp_path / "run", printer=lambda s: None, progress=False)
    return run


@pytest.mark.parametrize("model", list_models())
@pytest.mark.parametrize("exclude", [True, False])
def test_exact_index_top_k_equals_full_scoring(tmp_path, model, exclude):
    run = trained_run(tmp_path, model)
    assert (run / "index.faiss").is_file() and (run / "index.json").is_file()
    r = Retriever(run)
    users = list(range(r.data.n_users))
    k = 10
    got = r.search(users, k, exclude_history=exclude)
    with torch.inference_mode():
        scores = r.model.scores(r.user_batch(users)).float()
    for row, u in enumerate(users):
        s = scores[row].clone()
        s[0] = -float("inf")  # padding is never recommended
        if exclude:
            s[torch.as_tensor(r.history(u))] = -float("inf")
        top = torch.topk(s, k)
        ids = [x.item_id for x in got[row]]
        got_scores = np.array([x.score for x in got[row]])
        np.testing.assert_allclose(got_scores, top.values.numpy(), rtol=1e-5, atol=1e-5)
        # same items in the same order, up to exact score ties (compare as score-sorted sets)
        kth = float(top.values[-1])
        strict = {int(i) for i, v in zip(top.indices, top.values) if v > kth + 1e-5}
        assert strict <= set(ids), (model, u)
        assert all(float(s[i]) >= kth - 1e-5 for i in ids)
        if exclude:
            assert not set(ids) & set(r.history(u).tolist())
    if model == "sasrec" and exclude:  # the Python API rejects what the CLI rejects
        from athwe.errors import AthweError

        with pytest.raises(AthweError, match="-k must be at least 1"):
            r.search(users[:1], 0)
        with pytest.raises(AthweError, match="--batch-size must be at least 1"):
            r.write_all(tmp_path / "all.jsonl", batch_size=0)
        assert not (tmp_path / "all.jsonl").exists()


def test_approximate_indexes_have_high_recall():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32))
    x = (centers[rng.integers(0, 50, 20_000)] + 0.3 * rng.normal(size=(20_000, 32))).astype(np.float32)
    q = (centers[rng.integers(0, 50, 200)] + 0.3 * rng.normal(size=(200, 32))).astype(np.float32)
    exact, _ = build_index(x, "flat")
    _, truth = exact.search(q, 10)
    for kind in ("hnsw", "ivfpq"):
        idx, meta = build_index(x, kind, nlist=100)
        _, ids = idx.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        assert recall >= 0.95, (kind, recall)
        assert ids.min() >= 1  # FAISS ids are item ids; padding is never indexed


def test_index_mismatch_is_refused_and_cli(tmp_path):
    run = trained_run(tmp_path, "sasrec")
    runner = CliRunner()
    res = runner.invoke(app, ["retrieve", "--run", str(run), "--user", "u3", "-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    recs = json.loads(res.stdout)
    assert [x["rank"] for x in recs] == [1, 2, 3, 4, 5]
    res = runner.invoke(app, ["retrieve", "--run", str(run), "--user", "nobody"])
    assert res.exit_code == 2 and "unknown user 'nobody'" in res.stderr
    out = tmp_path / "all.jsonl"
    res = runner.invoke(app, ["retrieve", "--run", str(run), "--all-users", "--out", str(out), "-k", "3"])
    assert res.exit_code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 80 and all(len(x["items"]) == 3 for x in lines)
    # a changed checkpoint makes the saved index stale: refused, then rebuilt on demand
    state = torch.load(run / "best.pt", weights_only=True)
    state["embedding.item.weight"] += 1.0
    torch.save(state, run / "best.pt")
    res = runner.invoke(app, ["retrieve", "--run", str(run), "--user", "u3"])
    assert res.exit_code == 2 and "another checkpoint" in res.stderr
    res = runner.invoke(app, ["index", "--run", str(run), "--kind", "hnsw"])
    assert res.exit_code == 0 and "hnsw index" in res.stdout
    assert Retriever(run).meta["kind"] == "hnsw"
    (run / "index.json").unlink()
    res = runner.invoke(app, ["retrieve", "--run", str(run), "--user", "u3"])
    assert res.exit_code == 2 and "no index" in res.stderr
    build_run_index(run)
    meta = json.loads((run / "index.json").read_text())
    meta["item_fingerprint"] = "0" * 16
    (run / "index.json").write_text(json.dumps(meta))
    res = runner.invoke(app, ["retrieve", "--run", str(run), "--user", "u3"])
    assert res.exit_code == 2 and "item map" in res.stderr


@pytest.mark.parametrize("kind,knobs,needle", [
    ("hnsw", {"hnsw_m": 1}, "--hnsw-m must be at least 2"),
    ("hnsw", {"ef_search": 0}, "--ef-construction and --ef-search"),
    ("ivfpq", {"nlist": 301}, "--nlist must be between 1 and the 300 training vectors"),
    ("ivfpq", {"nlist": 0}, "--nlist must be between"),
    ("ivfpq", {"pq_m": 0}, "--pq-m must be at least 1"),
    ("ivfpq", {"nprobe": 0}, "--nprobe must be at least 1"),
])
def test_index_knobs_faiss_would_abort_on_are_one_line_errors(kind, knobs, needle):
    from athwe.errors import AthweError

    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    with pytest.raises(AthweError, match=needle):
        build_index(x, kind, **knobs)
    with pytest.raises(AthweError, match="needs at least 256 items"):
        build_index(x[:200], "ivfpq")

