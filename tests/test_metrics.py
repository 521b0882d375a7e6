"""Full-ranking metrics: athwe.evaluation.metrics against an independent brute-force reference.

Protocol (specs/protocol.md): padding item 0 never ranks; rank = number of items with a strictly
higher score (ties go to the target); HR@K = [rank < K], NDCG@K = 1/log2(rank+2), MRR@K = 1/(rank+1).
History modes: "none" (rankable), "zero" (history scores set to 0), "exclude" (history removed; a
target that is in the history is a miss).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from athwe.dataset.split import SampleSet
from athwe.evaluation.metrics import evaluate, metrics_from_ranks

KS = (5, 10, 20, 50)


# ----------------------------------------------------------------------------- reference


def reference_ranks(scores: np.ndarray, targets: list[int], histories: list[list[int]], mode: str) -> list[int | None]:
    """Plain loops. Returns each row's rank, or None for a guaranteed miss (excluded target)."""
    ranks: list[int | None] = []
    n_cols = scores.shape[1]
    for r in range(scores.shape[0]):
        row = [scores[r, j] for j in range(n_cols)]
        hist = set(histories[r])
        if mode == "zero":
            for j in hist:
                row[j] = np.float32(0.0)
        t = targets[r]
        if mode == "exclude" and t in hist:
            ranks.append(None)
            continue
        rank = 0
        for j in range(1, n_cols):  # item 0 (padding) never ranks
            if mode == "exclude" and j in hist:
                continue
            if row[j] > row[t]:
                rank += 1
        ranks.append(rank)
    return ranks


def reference_metrics(ranks: list[int | None], ks=KS) -> dict[str, float]:
    out: dict[str, float] = {}
    n = len(ranks)
    for k in ks:
        hr = ndcg = mrr = 0.0
        for rank in ranks:
            if rank is not None and rank < k:
                hr += 1.0
                ndcg += 1.0 / math.log2(rank + 2)
                mrr += 1.0 / (rank + 1)
        out[f"HR@{k}"] = hr / n
        out[f"NDCG@{k}"] = ndcg / n
        out[f"MRR@{k}"] = mrr / n
    return out


# ----------------------------------------------------------------------------- helpers


def make_samples(targets: list[int], histories: list[list[int]], seq_len: int = 4) -> SampleSet:
    """A hand-built evaluation SampleSet; `user` holds the row index (used by the score_fn)."""
    s = len(targets)
    ptr = [0]
    flat: list[int] = []
    for h in histories:
        flat.extend(h)
        ptr.append(len(flat))
    return SampleSet(
        input_ids=torch.zeros(s, seq_len, dtype=torch.long),
        timestamps=torch.zeros(s, seq_len, dtype=torch.float64),
        target=torch.tensor(targets, dtype=torch.long),
        user=torch.arange(s, dtype=torch.long),
        target_time=torch.zeros(s, dtype=torch.float64),
        history_ptr=torch.tensor(ptr, dtype=torch.long),
        history_items=torch.tensor(flat, dtype=torch.long),
    )


def score_fn_for(scores: np.ndarray):
    table = torch.from_numpy(scores)

    def score_fn(batch):
        return table[batch.user].clone()

    return score_fn


def random_case(seed: int, n_rows: int = 150, n_items: int = 300, max_hist: int = 40):
    """Scores rounded to 1 decimal (many exact ties, many negatives, some exact zeros); item 0
    often scored highest; about a third of targets also appear in their history."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(0.0, 1.0, size=(n_rows, n_items + 1)), 1).astype(np.float32)
    scores[rng.random(n_rows) < 0.5, 0] = 10.0  # padding would win if it were ranked
    targets: list[int] = []
    histories: list[list[int]] = []
    for r in range(n_rows):
        hist = [int(x) for x in rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(0, max_hist + 1)),
                                           replace=False)]
        if hist and rng.random() < 0.35:
            t = int(rng.choice(hist))
        else:
            t = int(rng.integers(1, n_items + 1))
        # make the target tie with several other items in some rows
        if rng.random() < 0.3:
            scores[r, rng.choice(np.arange(1, n_items + 1), size=5, replace=False)] = scores[r, t]
        targets.append(t)
        histories.append(hist)
    return scores, targets, histories


# ----------------------------------------------------------------------------- reference comparison


@pytest.mark.parametrize("mode", ["none", "zero", "exclude"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_matches_brute_force_reference(mode, seed):
    scores, targets, histories = random_case(seed)
    # the case must exercise what it claims to
    assert sum(t in h for t, h in zip(targets, histories)) > 20
    assert (scores < 0).mean() > 0.3
    samples = make_samples(targets, histories)
    metrics, ranks = evaluate(score_fn_for(scores), samples, history=mode, batch_size=32)
    ref = reference_ranks(scores, targets, histories, mode)
    for r, (got, want) in enumerate(zip(ranks.tolist(), ref)):
        if want is None:  # excluded target: a miss at every K
            assert got >= max(KS), r
        else:
            assert got == want, (r, got, want)
    want_metrics = reference_metrics(ref)
    assert set(metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # sanity: the three modes really give different answers on this data
    if mode != "none":
        base = reference_metrics(reference_ranks(scores, targets, histories, "none"))
        assert any(abs(base[k] - want_metrics[k]) > 1e-9 for k in base)


def test_modes_differ_where_the_protocol_says():
    # one row, 6 items. target 3 (score -0.5) is not in the history; history = {1, 2}.
    scores = np.array([[9.0, 2.0, -0.2, -0.5, -0.3, 0.4, -0.5]], dtype=np.float32)
    samples = make_samples([3], [[1, 2]])
    fn = score_fn_for(scores)
    # none: items 1 (2.0), 2 (-0.2), 4 (-0.3), 5 (0.4) above; 6 ties; padding 0 ignored -> 4
    assert evaluate(fn, samples, history="none")[1].tolist() == [4]
    # zero: items 1, 2 -> 0.0, still above -0.5 -> 4
    assert evaluate(fn, samples, history="zero")[1].tolist() == [4]
    # exclude: items 1, 2 gone -> 4 (-0.3), 5 (0.4) above -> 2
    assert evaluate(fn, samples, history="exclude")[1].tolist() == [2]

    # target 2 (-0.2) is in the history
    samples = make_samples([2], [[1, 2]])
    # none: 1 (2.0) and 5 (0.4) above; 4 (-0.3), 3 and 6 (-0.5) below -> rank 2
    assert evaluate(fn, samples, history="none")[1].tolist() == [2]
    # zero: target becomes 0.0, item 1 becomes 0.0 (tie, not counted), 5 (0.4) above -> 1
    assert evaluate(fn, samples, history="zero")[1].tolist() == [1]


# ----------------------------------------------------------------------------- hand-computed


def test_hand_computed_ranks_and_metrics():
    # 10 items. Row 0: target 4 scored highest (padding higher still, ignored) -> rank 0.
    # Row 1: target 7 with 3 items strictly above and 2 tied -> rank 3.
    # Row 2: target 1 with 6 items above -> rank 6.
    s = np.zeros((3, 11), dtype=np.float32)
    s[0] = [99, 0.1, 0.2, 0.3, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    s[1] = [99, 0.1, 0.8, 0.7, 0.5, 0.5, 0.6, 0.5, 0.2, 0.1, 0.0]
    s[2] = [99, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, -0.1, 0.0]
    samples = make_samples([4, 7, 1], [[], [], []])
    metrics, ranks = evaluate(score_fn_for(s), samples, history="none", ks=(1, 3, 4, 5, 10))
    assert ranks.tolist() == [0, 3, 6]
    assert metrics["HR@1"] == pytest.approx(1 / 3)
    assert metrics["NDCG@1"] == pytest.approx(1 / 3)
    assert metrics["HR@3"] == pytest.approx(1 / 3)  # rank 3 is not < 3
    assert metrics["HR@4"] == pytest.approx(2 / 3)
    assert metrics["NDCG@4"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert metrics["MRR@5"] == pytest.approx((1.0 + 0.25) / 3)
    assert metrics["HR@10"] == pytest.approx(1.0)
    assert metrics["NDCG@10"] == pytest.approx((1.0 + 1.0 / math.log2(5) + 1.0 / math.log2(8)) / 3)
    assert metrics["MRR@10"] == pytest.approx((1.0 + 0.25 + 1.0 / 7) / 3)


def test_single_rank_values():
    one = metrics_from_ranks(torch.tensor([0]), ks=(5,))
    assert one == {"HR@5": 1.0, "NDCG@5": 1.0, "MRR@5": 1.0}
    three = metrics_from_ranks(torch.tensor([3]), ks=(5,))
    assert three["NDCG@5"] == pytest.approx(1.0 / math.log2(5))
    assert three["MRR@5"] == pytest.approx(0.25)
    assert three["HR@5"] == 1.0


def test_all_tied_target_ranks_first():
    s = np.full((1, 21), 0.3, dtype=np.float32)
    metrics, ranks = evaluate(score_fn_for(s), make_samples([11], [[]]), ks=(1,))
    assert ranks.tolist() == [0] and metrics == {"HR@1": 1.0, "NDCG@1": 1.0, "MRR@1": 1.0}


def test_metrics_from_ranks_known_values():
    ranks = torch.tensor([0, 1, 4, 5, 9, 10, 19, 49, 50, 1000])
    m = metrics_from_ranks(ranks)
    assert set(m) == {f"{name}@{k}" for name in ("HR", "NDCG", "MRR") for k in KS}
    n = 10
    assert m["HR@5"] == pytest.approx(3 / n)
    assert m["HR@10"] == pytest.approx(5 / n)
    assert m["HR@20"] == pytest.approx(7 / n)
    assert m["HR@50"] == pytest.approx(8 / n)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / n)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(7)
                                          + 1 / math.log2(11)) / n)
    assert m["NDCG@50"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(7)
                                          + 1 / math.log2(11)
                                          + 1 / math.log2(12) + 1 / math.log2(21) + 1 / math.log2(51)) / n)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / n)
    assert m["MRR@20"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 10 + 1 / 11 + 1 / 20) / n)
    assert m["MRR@50"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 10 + 1 / 11 + 1 / 20 + 1 / 50) / n)
    # custom ks
    assert metrics_from_ranks(torch.tensor([2, 3]), ks=(3,)) == pytest.approx(
        {"HR@3": 0.5, "NDCG@3": 0.25, "MRR@3": 1 / 6})


# ----------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("mode", ["none", "zero", "exclude"])
def test_results_do_not_depend_on_batch_size(mode):
    scores, targets, histories = random_case(7, n_rows=150)
    samples = make_samples(targets, histories)
    fn = score_fn_for(scores)
    results = {bs: evaluate(fn, samples, history=mode, batch_size=bs) for bs in (1, 7, 64, 10_000)}
    m0, r0 = results[10_000]
    for bs, (m, r) in results.items():
        assert torch.equal(r, r0), bs
        assert m == m0, bs  # exactly equal floats


def test_evaluate_rejects_unknown_history_mode():
    with pytest.raises(ValueError):
        evaluate(score_fn_for(np.zeros((1, 5), dtype=np.float32)), make_samples([1], [[]]), history="mask")


# ----------------------------------------------------------------------------- known bug


def test_exclude_mode_target_in_history_is_a_miss_even_in_a_small_catalogue():
    """Module docstring: with ``exclude``, 'a target that also appears in the history then counts as
    a miss'. With fewer than K rankable items left, the excluded (-inf) target's rank is the number
    of remaining items, which is < K, so it is counted as a hit."""
    n_items = 30
    scores = np.linspace(1.0, -1.0, n_items + 1).astype(np.float32)[None, :]
    samples = make_samples([3], [[3, 4]])
    metrics, ranks = evaluate(score_fn_for(scores), samples, history="exclude")
    for k in KS:
        assert metrics[f"HR@{k}"] == 0.0, (k, ranks.tolist())
        assert metrics[f"NDCG@{k}"] == 0.0, k
        assert metrics[f"MRR@{k}"] == 0.0, k
