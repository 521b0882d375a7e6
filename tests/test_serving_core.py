"""Recommendations for any history through Retriever: for every model the scores are its own and the
top k is its full ranking's, a known user's history given as items is answered as the user is,
requests batch like single calls, and bad requests are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from athwe.dataset.split import Batch
from athwe.errors import AthweError
from athwe.models import list_models
from athwe.models.athwe import fingerprint_text
from athwe.retrieval import Request, Retriever, add_to_index, build_index
from test_retrieval import trained_run

torch.set_num_threads(1)
K = 10


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """run_of(model): a tiny trained run of `model`, trained once per module (inside the first test
    that asks, so the per-test cache folder applies)."""
    made = {}

    def get(model: str):
        if model not in made:
            made[model] = trained_run(tmp_path_factory.mktemp(model), model)
        return made[model]
    return get


def histories(r: Retriever, seed: int = 0) -> list[tuple[list[int], list[float]]]:
    """Histories of trained items with increasing timestamps: one item, a few, and more than the
    model reads (max_seq_length)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (1, 3, r.cfg.data.max_seq_length + 4):
        ids = rng.integers(1, r.data.n_items + 1, n).tolist()
        times = (1.6e9 + np.cumsum(rng.integers(0, 86_400, n))).astype(float).tolist()
        out.append((ids, times))
    return out


def model_scores(r: Retriever, hists: list[tuple[list[int], list[float]]]) -> torch.Tensor:
    """model.scores on the left-padded batch of each history's last max_seq_length items."""
    n = r.cfg.data.max_seq_length
    ids = torch.zeros(len(hists), n, dtype=torch.long)
    ts = torch.zeros(len(hists), n, dtype=torch.float64)
    for row, (h, t) in enumerate(hists):
        h, t = h[-n:], t[-n:]
        ids[row, n - len(h):] = torch.tensor(h)
        ts[row, n - len(t):] = torch.tensor(t, dtype=torch.float64)
    batch = Batch(ids, ts, torch.zeros(len(hists), dtype=torch.long), torch.full((len(hists),), -1), ts[:, -1])
    with torch.inference_mode():
        return r.model.scores(batch).float()


def assert_top_k(recs, scores: torch.Tensor, dropped: set[int], k: int, where: str) -> None:
    """`recs` are the top k of `scores` (padding and `dropped` left out), ties aside, with its scores."""
    s = scores.clone()
    s[0] = -float("inf")
    if dropped:
        s[torch.tensor(sorted(dropped))] = -float("inf")
    top = torch.topk(s, k)
    ids = [x.item_id for x in recs]
    assert len(ids) == k and not set(ids) & dropped, where
    np.testing.assert_allclose([x.score for x in recs], top.values.numpy(), rtol=1e-5, atol=1e-5, err_msg=where)
    np.testing.assert_allclose([x.score for x in recs], s[ids].numpy(), rtol=1e-5, atol=1e-5, err_msg=where)
    kth = float(top.values[-1])
    assert {int(i) for i, v in zip(top.indices, top.values) if v > kth + 1e-5} <= set(ids), where


@pytest.mark.parametrize("model", list_models())
def test_any_history_gets_the_models_own_scores_and_top_k(run_of, model):
    r = Retriever(run_of(model))
    assert r.meta["kind"] == "flat"
    hists = histories(r)
    scores = model_scores(r, hists)
    requests = [Request(items=[r.tokens[i] for i in h], timestamps=t, k=K, exclude_history=False) for h, t in hists]
    batched = r.recommend_batch(requests)
    for row, (req, recs) in enumerate(zip(requests, batched)):
        assert_top_k(recs, scores[row], set(), K, f"{model} history {row}")
        single = r.recommend(items=req.items, timestamps=req.timestamps, k=K, exclude_history=False)
        assert_top_k(single, scores[row], set(), K, f"{model} history {row} alone")
    # history and explicit exclusions are left out, and the rest is still the model's ranking
    h, t = hists[1]
    never = [r.tokens[1], r.tokens[2]]
    recs = r.recommend(items=[r.tokens[i] for i in h], timestamps=t, k=K, exclude=never)
    assert_top_k(recs, scores[1], set(h) | {1, 2}, K, f"{model} exclusions")
    # a known user's whole history given as items (with its timestamps) is answered exactly as the user
    for u in (0, 5, 17):
        user, hist = r.data.user_tokens[u], r.history(u)
        a, b = int(r.data.offsets[u]), int(r.data.offsets[u + 1])
        for exclude_history in (True, False):
            by_user = r.recommend(user, k=K, exclude_history=exclude_history)
            by_items = r.recommend(items=[r.tokens[i] for i in hist], timestamps=r.data.times[a:b].tolist(), k=K,
                                   exclude_history=exclude_history)
            assert by_items == by_user, (model, user)
    assert r.recommend("u3", k=K) == r.search([r.resolve_user("u3")], K)[0]  # the positional call still works


def test_timestamps_required_where_the_model_reads_them(run_of):
    athwe = Retriever(run_of("athwe"))
    assert athwe.model.uses_timestamps and athwe.info()["uses_timestamps"]
    with pytest.raises(AthweError, match="timestamps are required") as e:
        athwe.recommend(items=["i1", "i2"], k=3)
    assert "\n" not in str(e.value)
    sas = Retriever(run_of("sasrec"))
    assert not sas.model.uses_timestamps
    items = ["i4", "i9", "i2"]
    without = sas.recommend(items=items, k=5)
    with_times = sas.recommend(items=items, timestamps=[1.6e9, 1.6e9 + 60, 1.6e9 + 7200], k=5)
    assert without == with_times
    # the gaps matter to the time-routed model: the same items at other times score differently
    near = athwe.recommend(items=items, timestamps=[1.6e9, 1.6e9 + 1, 1.6e9 + 2], k=5, exclude_history=False)
    far = athwe.recommend(items=items, timestamps=[1.6e9, 1.6e9 + 3e7, 1.6e9 + 9e7], k=5, exclude_history=False)
    assert [x.score for x in near] != [x.score for x in far]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(items=["i1", "nope"]), "unknown item 'nope' in items"),
    (dict(items=["i1"], exclude=["nope"]), "unknown item 'nope' in exclude"),
    (dict(user="u1", exclude=["i1", "zz"]), "unknown item 'zz' in exclude"),
    (dict(items=["i1"], exclude="i2"), "exclude must be a list"),
    (dict(items="i1"), "items must be a list"),
    (dict(items=[]), "items is empty"),
    (dict(items=[1]), "item tokens in items must be strings"),
    (dict(user="nobody"), "unknown user 'nobody'"),
    (dict(), "exactly one of user"),
    (dict(user="u1", items=["i1"]), "exactly one of user"),
    (dict(user="u1", timestamps=[1.0]), "timestamps go with items"),
    (dict(items=["i1"], k=0), "-k must be at least 1, got 0"),
    (dict(items=["i1"], k=51), "-k 51 is more than the 50 items of the catalogue"),
    (dict(items=["i1"], k=2.5), "-k must be a whole number"),
    (dict(items=["i1", "i2"], timestamps=[1.0]), "timestamps: 1 value for 2 items"),
    (dict(items=["i1", "i2"], timestamps=[1.0, float("nan")]), r"value 2 \(nan\) is not a finite number"),
    (dict(items=["i1", "i2"], timestamps=[5.0, 4.0]), r"must not decrease .* value 2 \(4\) is before value 1 \(5\)"),
    (dict(items=["i1", "i2"], timestamps=[1.0, "2"]), r"value 2 \('2'\) is not a number"),
])
def test_bad_requests_are_one_line_errors(run_of, kwargs, needle):
    r = Retriever(run_of("sasrec"))
    user = kwargs.pop("user", None)
    with pytest.raises(AthweError, match=needle) as e:
        r.recommend(user, **kwargs)
    assert "\n" not in str(e.value)


def test_batch_equals_single_calls_and_names_a_bad_request(run_of):
    r = Retriever(run_of("sasrec"))
    reqs = [Request(user="u1", k=4), Request(items=["i3", "i7"], k=6, exclude=["i8"]),
            Request(items=["i9"], k=2, exclude_history=False), Request(user="u2", k=5, exclude=["i1", "i2", "i3"])]
    batched = r.recommend_batch(reqs)
    assert [len(x) for x in batched] == [4, 6, 2, 5]
    for req, recs in zip(reqs, batched):
        single = r.recommend(req.user, items=req.items, timestamps=req.timestamps, k=req.k, exclude=req.exclude,
                             exclude_history=req.exclude_history)
        assert [x.item for x in single] == [x.item for x in recs]
        np.testing.assert_allclose([x.score for x in single], [x.score for x in recs], rtol=1e-5, atol=1e-6)
    assert r.recommend_batch([]) == []
    with pytest.raises(AthweError, match="^request 2: unknown item 'nope' in items"):
        r.recommend_batch([Request(user="u1"), Request(items=["nope"])])


def test_info_and_item(run_of):
    r = Retriever(run_of("sasrec"))
    info = r.info()
    assert info["model"] == "sasrec" and info["dataset"] == "tiny" and info["index_kind"] == "flat"
    assert (info["trained_items"], info["added_items"], info["index_items"]) == (50, 0, 50)
    assert info["feature_fingerprint"] is None and not info["accepts_new_items"]
    assert info["item_fingerprint"] == r.data.item_fingerprint and len(info["checkpoint_fingerprint"]) == 16
    assert r.item("i7") == {"token": "i7", "id": r.token_index["i7"], "title": None, "added": False}
    with pytest.raises(AthweError, match="^unknown item 'nope'"):
        r.item("nope")
    athwe = Retriever(run_of("athwe"))
    info = athwe.info()
    assert info["feature_fingerprint"] == fingerprint_text(athwe.model.feature_fingerprint)
    assert len(info["feature_fingerprint"]) == 16 and info["accepts_new_items"]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_every_index_kind_takes_added_vectors(kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    index, _ = build_index(x, kind)
    new = 10.0 * x[:3] / np.linalg.norm(x[:3], axis=1, keepdims=True)
    add_to_index(index, new, 301)
    assert index.ntotal == 303
    for j in range(3):
        scores, ids = index.search(new[j:j + 1], 303)
        assert ids[0, 0] == 301 + j
        np.testing.assert_allclose(scores[0, 0], float(new[j] @ new[j]), rtol=1e-4)
