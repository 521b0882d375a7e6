"""Tests for the bundled demo dataset (athwe.dataset.demo)."""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from athwe.dataset import demo
from athwe.dataset.demo import DEMO_NAME, DEMO_VERSION, ensure_demo, generate_demo

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token_seq\tdescription:token_seq\tcategories:token_seq\tbrand:token\timage:token"
HOUR, DAY = 3600, 86400


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def _interactions(folder: Path) -> list[tuple[str, str, int]]:
    lines = _read_lines(folder / f"{DEMO_NAME}.inter")
    assert lines[-1] == ""
    rows = []
    for line in lines[1:-1]:
        u, i, ts = line.split("\t")
        assert ts.isdigit(), f"timestamp {ts!r} is not an integer"
        rows.append((u, i, int(ts)))
    return rows


def _items(folder: Path) -> dict[str, list[str]]:
    lines = _read_lines(folder / f"{DEMO_NAME}.item")
    assert lines[-1] == ""
    out = {}
    for line in lines[1:-1]:
        fields = line.split("\t")
        assert len(fields) == 6
        out[fields[0]] = fields
    return out


def _by_user(rows: list[tuple[str, str, int]]) -> dict[str, list[tuple[int, str]]]:
    users: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for u, i, ts in rows:
        users[u].append((ts, i))
    return users


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("seed0") / DEMO_NAME, seed=0)


def test_determinism(tmp_path: Path) -> None:
    small = {"n_users": 300, "n_items": 300}  # same code path as the full size, faster
    first = generate_demo(tmp_path / "first" / DEMO_NAME, seed=0, **small)
    again = generate_demo(tmp_path / "again" / DEMO_NAME, seed=0, **small)
    other = generate_demo(tmp_path / "other" / DEMO_NAME, seed=1, **small)
    for name in (f"{DEMO_NAME}.inter", f"{DEMO_NAME}.item"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
        assert (first / name).read_bytes() != (other / name).read_bytes()
    tokens = ("i0001", "i0150", "i0300")
    for tok in tokens:
        assert (first / f"images/{tok}.png").read_bytes() == (again / f"images/{tok}.png").read_bytes()
    assert any((first / f"images/{t}.png").read_bytes() != (other / f"images/{t}.png").read_bytes() for t in tokens)
    assert json.loads((other / demo.MARKER).read_text())["seed"] == 1


def test_counts_and_format(demo_dir: Path) -> None:
    assert _read_lines(demo_dir / f"{DEMO_NAME}.inter")[0] == INTER_HEADER
    assert _read_lines(demo_dir / f"{DEMO_NAME}.item")[0] == ITEM_HEADER
    rows = _interactions(demo_dir)
    items = _items(demo_dir)
    users = _by_user(rows)
    assert len(users) == 2000 and len(items) == 1000
    assert 40_000 <= len(rows) <= 55_000
    lengths = [len(v) for v in users.values()]
    assert min(lengths) >= 5 and max(lengths) <= 80 and 18 <= np.mean(lengths) <= 27
    for events in users.values():
        times = [t for t, _ in events]
        assert times == sorted(times)
        assert len({i for _, i in events}) == len(events), "a user repeated an item"
    stamps = np.array([ts for _, _, ts in rows])
    assert stamps.min() >= demo.T0 and stamps.max() - stamps.min() <= 731 * DAY
    counts = Counter(i for _, i, _ in rows)
    assert set(counts) == set(items) and min(counts.values()) >= 3

    paths = [tuple(f[3].split(" ")) for f in items.values()]
    assert all(len(p) == 3 for p in paths)
    assert len({p[0] for p in paths}) == 5
    assert 45 <= len(set(paths)) <= 55
    assert 30 <= len({f[4] for f in items.values()}) <= 45
    for tok, f in items.items():
        assert f[1].strip() and f[2].strip() and f[5] == f"images/{tok}.png"
        with Image.open(demo_dir / f[5]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"

    marker = json.loads((demo_dir / demo.MARKER).read_text())
    assert marker["version"] == DEMO_VERSION and marker["seed"] == 0
    assert marker["n_interactions"] == len(rows)


def test_planted_temporal_structure(demo_dir: Path) -> None:
    items = _items(demo_dir)
    path = {tok: f[3].split(" ") for tok, f in items.items()}
    tops = sorted({p[0] for p in path.values()})
    users = _by_user(_interactions(demo_dir))
    short_same, short_n, long_same, long_n = 0, 0, 0, 0
    table = np.zeros((6, len(tops)))  # two-month groups x top category, after long gaps
    for events in users.values():
        # the transition a -> b follows the gap that led to a
        for (t_before, _), (t0, a), (t1, b) in zip(events, events[1:], events[2:]):
            gap, same = t0 - t_before, path[a][2] == path[b][2]
            if gap < HOUR:
                short_n += 1
                short_same += same
            elif gap > 14 * DAY:
                long_n += 1
                long_same += same
                month = datetime.fromtimestamp(t1, tz=timezone.utc).month
                table[(month - 1) // 2, tops.index(path[b][0])] += 1
    p_short, p_long = short_same / short_n, long_same / long_n
    assert short_n > 5000 and long_n > 5000
    # measured for seed 0: p_short ~0.73, p_long ~0.11
    assert p_short > 0.6 and p_long < 0.2 and p_short - p_long > 0.4

    # the calendar drives the top category after long gaps (seed 0: 5 distinct leaders, chi2 ~4000)
    assert len(set(table.argmax(axis=1).tolist())) >= 4
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    assert chi2 > 50 * dof
    cramers_v = np.sqrt(chi2 / table.sum() / (min(table.shape) - 1))
    assert cramers_v > 0.2


def test_items_alone_do_not_tell_the_next_transition(demo_dir: Path) -> None:
    """Gap kinds are independent, so whether the previous transition stayed in its leaf says
    nothing about the next one: the planted signal is only in the timestamps."""
    leaf = {tok: f[3] for tok, f in _items(demo_dir).items()}
    same, count = np.zeros(2), np.zeros(2)
    for events in _by_user(_interactions(demo_dir)).values():
        for (_, a), (_, b), (_, c) in zip(events, events[1:], events[2:]):
            k = int(leaf[a] == leaf[b])
            same[k] += leaf[b] == leaf[c]
            count[k] += 1
    p = same / count
    assert count.min() > 5000 and abs(p[1] - p[0]) < 0.05


def gap_kind(gap: float) -> int:
    """0 short (under a day), 1 medium (under ten days), 2 long: the demo's gap kinds, read back."""
    return 0 if gap < DAY else (1 if gap < 10 * DAY else 2)


def test_history_gaps_predict_the_next_transition(demo_dir: Path) -> None:
    """What a model sees: the gap before the *last history item* (not the unseen gap before the
    target) changes how often the next item continues the last item's leaf category."""
    leaf = {tok: f[3] for tok, f in _items(demo_dir).items()}
    same, count = np.zeros(3), np.zeros(3)
    for events in _by_user(_interactions(demo_dir)).values():
        for (t0, _), (t1, a), (_, b) in zip(events, events[1:], events[2:]):
            k = gap_kind(t1 - t0)
            same[k] += leaf[a] == leaf[b]
            count[k] += 1
    p = same / count
    # what the generator plants: ~0.7 after a short gap, ~0.4 medium, ~0.1 long
    assert p[0] > 0.6 and p[2] < 0.2 and p[1] - p[2] > 0.15


def test_ensure_demo(tmp_path: Path) -> None:
    folder = ensure_demo(tmp_path)
    assert folder == tmp_path / DEMO_NAME
    (tmp_path / "plain").mkdir()  # the mode a plain mkdir gives under this umask, not mkdtemp's 0o700
    assert folder.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    (tmp_path / "plain").rmdir()
    marker = folder / demo.MARKER
    assert json.loads(marker.read_text())["version"] == DEMO_VERSION
    stamps = {p: p.stat().st_mtime_ns for p in (marker, folder / f"{DEMO_NAME}.inter")}

    assert ensure_demo(tmp_path) == folder  # marker matches: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    data = json.loads(marker.read_text())
    inter_bytes = (folder / f"{DEMO_NAME}.inter").read_bytes()
    assert demo.demo_is_current(tmp_path)
    marker.write_text(json.dumps({**data, "version": DEMO_VERSION + 1}))
    assert not demo.demo_is_current(tmp_path)  # made by another generator version
    (folder / "stale.txt").write_text("from the old folder")
    assert ensure_demo(tmp_path) == folder
    assert demo.demo_is_current(tmp_path)
    assert json.loads(marker.read_text())["version"] == DEMO_VERSION
    assert not (folder / "stale.txt").exists()
    assert (folder / f"{DEMO_NAME}.inter").read_bytes() == inter_bytes
    assert sorted(os.listdir(tmp_path)) == [DEMO_NAME]  # no temp folders left behind


def test_marker_mismatch_detection(tmp_path: Path) -> None:
    folder = tmp_path / DEMO_NAME
    folder.mkdir()
    for ext in ("inter", "item"):
        (folder / f"{DEMO_NAME}.{ext}").write_text("x\n")
    good = {"version": DEMO_VERSION, "seed": 0, "n_users": 2000, "n_items": 1000}
    (folder / demo.MARKER).write_text(json.dumps(good))
    assert demo._marker_matches(folder, 0, 2000, 1000)
    assert not demo._marker_matches(folder, 1, 2000, 1000)
    (folder / demo.MARKER).write_text("{not json")
    assert not demo._marker_matches(folder, 0, 2000, 1000)


def test_failed_generation_keeps_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / DEMO_NAME
    folder.mkdir()
    (folder / "keep.txt").write_text("previous")

    def boom(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo, "_write_dataset", boom)
    with pytest.raises(RuntimeError):
        generate_demo(folder)
    assert (folder / "keep.txt").read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == [DEMO_NAME]


def test_fill_rare_items_keeps_leaves_and_times() -> None:
    cat = demo._make_catalogue(demo._rng(0, 1), 300)
    users = demo._make_interactions(demo._rng(0, 2), cat, 150)
    before = [list(ev) for ev in users]
    assert np.bincount([i for ev in users for _, i in ev], minlength=300).min() < 3
    demo._fill_rare_items(demo._rng(0, 3), cat, users)
    assert np.bincount([i for ev in users for _, i in ev], minlength=300).min() >= 3
    for old, new in zip(before, users):
        assert [t for t, _ in old] == [t for t, _ in new]
        assert [cat.item_leaf[i] for _, i in old] == [cat.item_leaf[i] for _, i in new]
        assert len({i for _, i in new}) == len(new)


def _companion(demo_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(item -> leaf path, leaf path -> its companion's path)."""
    leaf = {tok: f[3] for tok, f in _items(demo_dir).items()}
    paths = [lf.path for lf in demo.LEAVES]
    return leaf, {paths[i]: paths[j] for i, j in enumerate(demo.companion_leaves())}


def test_long_breaks_lead_to_the_companion_leaf(demo_dir: Path) -> None:
    leaf, companion = _companion(demo_dir)
    assert all(a.split(" ")[0] != b.split(" ")[0] for a, b in companion.items())  # another top category
    hits, count = np.zeros(3), np.zeros(3)
    for events in _by_user(_interactions(demo_dir)).values():
        for (t0, _), (t1, a), (_, b) in zip(events, events[1:], events[2:]):
            k = gap_kind(t1 - t0)
            hits[k] += leaf[b] == companion[leaf[a]]
            count[k] += 1
    p = hits / count
    # planted: 45% after a long break (plus chance), none otherwise beyond chance
    assert p[2] > 0.35 and p[0] < 0.05 and p[1] < 0.05


def test_the_last_gap_changes_what_belongs_at_the_top(demo_dir: Path) -> None:
    """A count-based scorer (P(next leaf | last leaf) x item popularity in the leaf, counted on the
    training transitions) ranks each user's held-out last item; told the gap before the last
    history item (P(next leaf | last leaf, gap kind)), its NDCG@10 rises by a large margin, so the
    timestamps change the ranking's top and not only probabilities (seed 0: .159 -> .197)."""
    leaf = {tok: f[3] for tok, f in _items(demo_dir).items()}
    items = sorted(leaf)
    leaves = sorted(set(leaf.values()))
    item_leaf = np.array([leaves.index(leaf[i]) for i in items])
    n = len(leaves)
    no_time, with_gap, pop = np.ones((n, n)), np.ones((3, n, n)), np.ones(len(items))

    users = [sorted(ev) for ev in _by_user(_interactions(demo_dir)).values()]
    for ev in users:
        train = ev[:-2]  # valid and test items held out
        for _, i in train:
            pop[items.index(i)] += 1
        for (t0, _), (t1, a), (_, b) in zip(train, train[1:], train[2:]):
            la, lb = leaves.index(leaf[a]), leaves.index(leaf[b])
            no_time[la, lb] += 1
            with_gap[gap_kind(t1 - t0), la, lb] += 1
    in_leaf = pop / np.bincount(item_leaf, weights=pop, minlength=n)[item_leaf]
    ndcg = np.zeros(2)
    for ev in users:
        (t0, _), (t1, a), (_, target) = ev[-3:]
        la = leaves.index(leaf[a])
        for j, row in enumerate((no_time[la], with_gap[gap_kind(t1 - t0), la])):
            scores = row[item_leaf] / row.sum() * in_leaf
            rank = int((scores > scores[items.index(target)]).sum())
            ndcg[j] += 1 / np.log2(rank + 2) if rank < 10 else 0.0
    ndcg /= len(users)
    assert ndcg[1] > 1.15 * ndcg[0], ndcg
