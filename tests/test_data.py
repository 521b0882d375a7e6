"""Data layer: atomic/.txt readers, load_sequences (ids, order, k-core, fingerprint, cache) and the
leave-one-out split, checked against a straightforward implementation of specs/protocol.md."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import athwe.dataset.sequences as seqmod
from athwe.dataset.atomic import read_atomic, read_sequence_txt
from athwe.dataset.sequences import load_sequences
from athwe.dataset.split import build_split
from athwe.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("ATHWE_CACHE_DIR", str(d))
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_inter(root: Path, name: str, rows: list[tuple],
                header: str = "user_id:token\titem_id:token\ttimestamp:float") -> Path:
    """Write <root>/<name>/<name>.inter and return root (the data_dir)."""
    lines = [header] + ["\t".join(str(x) for x in r) for r in rows]
    write(root / name / f"{name}.inter", "\n".join(lines) + "\n")
    return root


def write_txt(root: Path, name: str, lines: list[str]) -> Path:
    write(root / name / f"{name}.txt", "\n".join(lines) + "\n")
    return root


def user_seqs(data) -> dict[str, tuple[list[str], list[float]]]:
    """user token -> (item tokens, times), read back through the item map."""
    out = {}
    for u, tok in enumerate(data.user_tokens):
        a, b = int(data.offsets[u]), int(data.offsets[u + 1])
        out[tok] = ([data.item_tokens[i] for i in data.items[a:b].tolist()], data.times[a:b].tolist())
    return out


# ============================================================================ read_atomic


def test_read_atomic_typed_columns(tmp_path):
    p = write(tmp_path / "x.item",
              "item_id:token\tmovie_title:token_seq\tprice:float\temb:float_seq\tclass:token_seq\n"
              "i1\tToy Story\t1.5\t0.1 0.2 0.3\tAnimation Comedy\n"
              "i2\tHeat\t-2\t1e3 4\tAction\n"
              "\n"
              "i3\t\t0\t\t\n")
    t = read_atomic(p)
    assert t.path == p
    assert t.names == ["item_id", "movie_title", "price", "emb", "class"]
    assert t.types == {"item_id": "token", "movie_title": "token_seq", "price": "float", "emb": "float_seq",
                       "class": "token_seq"}
    assert len(t) == 3  # the blank line is skipped
    assert t.columns["item_id"] == ["i1", "i2", "i3"]
    assert t.columns["movie_title"] == [["Toy", "Story"], ["Heat"], []]
    assert t.columns["class"] == [["Animation", "Comedy"], ["Action"], []]
    price = t.columns["price"]
    assert isinstance(price, np.ndarray) and price.dtype == np.float64
    assert price.tolist() == [1.5, -2.0, 0.0]
    emb = t.columns["emb"]
    assert [e.tolist() for e in emb] == [[0.1, 0.2, 0.3], [1000.0, 4.0], []]
    assert all(e.dtype == np.float64 for e in emb)
    assert t.find("iid", "item_id") == "item_id" and t.find("nope") is None


def test_read_atomic_crlf_and_colon_in_name(tmp_path):
    p = write(tmp_path / "y.inter", "user_id:token\tx:y:float\r\nu1\t3\r\nu2\t4.5\r\n")
    t = read_atomic(p)
    assert t.names == ["user_id", "x:y"]
    assert t.columns["user_id"] == ["u1", "u2"]
    assert t.columns["x:y"].tolist() == [3.0, 4.5]


def _data_error(path: Path) -> str:
    with pytest.raises(DataError) as ei:
        read_atomic(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    return msg


def test_read_atomic_missing_file(tmp_path):
    msg = _data_error(tmp_path / "nope.inter")
    assert "not found" in msg


def test_read_atomic_empty_file(tmp_path):
    assert "empty" in _data_error(write(tmp_path / "e.inter", ""))
    assert "empty" in _data_error(write(tmp_path / "e2.inter", "\n\n"))


def test_read_atomic_header_field_without_type(tmp_path):
    msg = _data_error(write(tmp_path / "h.inter", "user_id:token\titem_id\ttimestamp:float\nu\ti\t1\n"))
    assert "'item_id'" in msg and "name:type" in msg


def test_read_atomic_unknown_type(tmp_path):
    msg = _data_error(write(tmp_path / "h.inter", "user_id:token\titem_id:int\nu\t1\n"))
    assert "'int'" in msg and "unknown type" in msg


def test_read_atomic_wrong_field_count_names_line(tmp_path):
    p = write(tmp_path / "w.inter", "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\n")
    msg = _data_error(p)
    assert f"{p}:3" in msg and "expected 3" in msg and "found 2" in msg


def test_read_atomic_non_numeric_timestamp_names_value_and_line(tmp_path):
    p = write(tmp_path / "t.inter",
              "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\t2\nu1\ti3\tyesterday\n")
    msg = _data_error(p)
    assert "'yesterday'" in msg and f"{p}:4" in msg and "timestamp" in msg


def test_read_atomic_non_finite_value(tmp_path):
    p = write(tmp_path / "n.inter", "user_id:token\ttimestamp:float\nu1\t1\nu1\tnan\n")
    msg = _data_error(p)
    assert "'nan'" in msg and f"{p}:3" in msg


def test_read_atomic_bad_number_line_number_counts_blank_lines(tmp_path):
    """Blank lines are skipped by the reader, but _to_float reports `row index + 2` as the line
    number, so an error after a blank line names the wrong line."""
    p = write(tmp_path / "b.inter", "user_id:token\titem_id:token\ttimestamp:float\n\nu1\ti1\t1\nu1\ti2\tabc\n")
    msg = _data_error(p)
    assert "'abc'" in msg
    assert f"{p}:4" in msg, msg  # 'abc' is on line 4


def test_read_atomic_bad_float_seq_value_line_number(tmp_path):
    """For float_seq columns _to_float is called per cell, so the reported 'line' is the position
    inside the cell + 2, not the file line."""
    p = write(tmp_path / "s.item", "item_id:token\temb:float_seq\ni1\t1 2\ni2\t3 4\ni3\t5 6\ni4\t7 8 zz\n")
    msg = _data_error(p)
    assert "'zz'" in msg
    assert f"{p}:5" in msg, msg  # 'zz' is on line 5


# ============================================================================ read_sequence_txt


def test_read_sequence_txt(tmp_path):
    p = write(tmp_path / "s.txt", "1 5 3 9\n2 4\n\n10 1 2 3 4\n")
    users, seqs = read_sequence_txt(p)
    assert users == ["1", "2", "10"]
    assert seqs == [["5", "3", "9"], ["4"], ["1", "2", "3", "4"]]


def test_read_sequence_txt_duplicate_user(tmp_path):
    p = write(tmp_path / "d.txt", "1 5 3\n2 4 6\n1 7 8\n")
    with pytest.raises(DataError) as ei:
        read_sequence_txt(p)
    msg = str(ei.value)
    assert str(p) in msg and ":3" in msg and "'1'" in msg


def test_read_sequence_txt_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_sequence_txt(tmp_path / "none.txt")
    with pytest.raises(DataError, match="no sequences"):
        read_sequence_txt(write(tmp_path / "e.txt", "\n\n"))


def test_read_sequence_txt_not_utf8(tmp_path, cache_dir):
    p = tmp_path / "data" / "bin" / "bin.txt"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"1 2 3\n\xff\xfe 4\n")
    with pytest.raises(DataError) as ei:
        read_sequence_txt(p)
    assert str(ei.value) == f"{p}:2: not UTF-8 text (invalid start byte at byte 1 of the line); save the file as UTF-8"
    with pytest.raises(DataError, match="not UTF-8"):
        load_sequences(tmp_path / "data", "bin")


# ============================================================================ encodings

BOM = b"\xef\xbb\xbf"
INTER = "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\t2\nu2\ti1\t3\nu2\ti3\t4\n"


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_utf8_bom_is_read_like_plain_utf8(tmp_path, cache_dir, newline):
    """A UTF-8 byte-order mark at the start of a file (what spreadsheet tools write) is dropped, in
    every reader of .inter/.item/.user/.txt files: the result equals the file without it."""
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    text = INTER.replace("\n", newline).encode("utf-8")
    for root, data in ((plain, text), (bom, BOM + text)):
        (root / "x").mkdir(parents=True)
        (root / "x" / "x.inter").write_bytes(data)
    a, b = load_sequences(plain, "x", use_cache=False), load_sequences(bom, "x", use_cache=False)
    assert b.user_tokens == a.user_tokens == ["u1", "u2"] and b.item_tokens == a.item_tokens
    assert b.item_fingerprint == a.item_fingerprint and torch.equal(a.items, b.items)
    item = write(tmp_path / "i.item", "item_id:token\ttitle:token_seq\ni1\tcopper pan\n")
    item.write_bytes(BOM + item.read_bytes())
    t = read_atomic(item)
    assert t.names == ["item_id", "title"] and t.columns["item_id"] == ["i1"]
    txt = tmp_path / "t" / "t" / "t.txt"
    txt.parent.mkdir(parents=True)
    txt.write_bytes(BOM + "u1 1 2 3\nu2 2 3\n".replace("\n", newline).encode())
    assert read_sequence_txt(txt) == (["u1", "u2"], [["1", "2", "3"], ["2", "3"]])
    assert load_sequences(tmp_path / "t", "t", use_cache=False).user_tokens == ["u1", "u2"]


@pytest.mark.parametrize("name, data, message", [
    ("latin1.inter", b"user_id:token\titem_id:token\nu1\ti1\nu\xe9\ti2\n",
     ":3: not UTF-8 text (invalid continuation byte at byte 2 of the line); save the file as UTF-8"),
    ("latin1-header.inter", b"user_id:token\titem_id:token\tna\xefve:token\nu1\ti1\tx\n",
     ":1: not UTF-8 text (invalid continuation byte at byte 31 of the line)"),
    ("utf16.inter", "user_id:token\titem_id:token\nu1\ti1\n".encode("utf-16"),
     ": UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    ("utf16-no-bom.inter", "user_id:token\titem_id:token\nu1\ti1\n".encode("utf-16-le"),
     ":1: NUL characters in the header (UTF-16 text?)"),
    ("stray-bom.inter", b"user_id:token\titem_id:token\nu1\ti1\n" + BOM + b"user_id:token\titem_id:token\n",
     ":3: byte-order mark (U+FEFF) inside the file, not at its start (were two files concatenated?)"),
    ("double-bom.inter", BOM + BOM + b"user_id:token\titem_id:token\nu1\ti1\n",
     ":1: byte-order mark (U+FEFF) inside the file"),
    ("latin1.txt", b"u1 1 2\nu\xe9 2 3\n", ":2: not UTF-8 text (invalid continuation byte at byte 2 of the line)"),
    ("stray-bom.txt", b"u1 1 2\n" + BOM + b"u2 2 3\n", ":2: byte-order mark (U+FEFF) inside the file"),
])
def test_other_encodings_are_one_line_errors_naming_file_and_line(tmp_path, name, data, message):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(DataError) as ei:
        read_sequence_txt(p) if name.endswith(".txt") else read_atomic(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}{message}") and "\n" not in msg, msg


def test_meta_jsonl_bom_and_bad_bytes(tmp_path):
    from athwe.dataset.meta import read_meta

    p = tmp_path / "x.meta.jsonl"
    p.write_bytes(BOM + b'{"item": "i1", "categories": [["A", "B"]]}\n{"item": "i2"}\n')
    assert list(read_meta(p, "categories", lambda v: isinstance(v, list), "a list")) == [("i1", [["A", "B"]]),
                                                                                          ("i2", [])]
    p.write_bytes(b'{"item": "i1"}\n{"item": "caf\xe9"}\n')
    with pytest.raises(DataError) as ei:
        list(read_meta(p, "categories", lambda v: isinstance(v, list), "a list"))
    assert str(ei.value).startswith(f"{p}:2: not UTF-8 text (invalid continuation byte")


@pytest.mark.parametrize("bad", ["0", "00", "a3", "-2", "1.5", "\u00b2", "\u0663", "\uff13"])
def test_load_sequences_txt_rejects_bad_item(tmp_path, cache_dir, bad):
    # superscript two, Arabic-Indic three and fullwidth three pass str.isdigit() but are not ids
    root = write_txt(tmp_path / "data", "bad", ["1 1 2 3", "", f"2 4 {bad} 5"])
    with pytest.raises(DataError) as ei:
        load_sequences(root, "bad")
    msg = str(ei.value)
    assert f"{root / 'bad' / 'bad.txt'}:3: user '2' has item {bad!r}" in msg, msg  # line 3: blank lines count
    assert "integers >= 1" in msg


@pytest.mark.parametrize("big", ["99999999999999999999999", str(2**63), str(2**63 - 1), "10000001", "1" + "0" * 5000])
def test_load_sequences_txt_rejects_too_large_item(tmp_path, cache_dir, big):
    root = write_txt(tmp_path / "data", "big", ["1 1 2 3", f"2 4 {big} 5"])
    with pytest.raises(DataError) as ei:
        load_sequences(root, "big")
    msg = str(ei.value)
    assert f"{root / 'big' / 'big.txt'}:2: user '2' has item" in msg and "10,000,000" in msg, msg
    assert len(msg) < 300 and "\n" not in msg


def test_load_sequences_txt_item_id_cap(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(seqmod, "MAX_TXT_ITEM_ID", 100)
    root = write_txt(tmp_path / "data", "cap", ["1 1 2 100", "2 0099 5"])
    data = load_sequences(root, "cap", use_cache=False)
    assert data.n_items == 100 and data.items.tolist() == [1, 2, 100, 99, 5]
    write_txt(root, "cap2", ["1 1 2 100", "2 101 5"])
    with pytest.raises(DataError, match="cap2.txt:2: .* ids above 100 are not supported"):
        load_sequences(root, "cap2", use_cache=False)


# ============================================================================ load_sequences: atomic


def test_load_atomic_ids_order_and_ties(tmp_path, cache_dir):
    # u1 and u2 interleaved in the file; u1 has equal timestamps that must keep file order
    rows = [
        ("u1", "apple", 30),
        ("u2", "kiwi", 30),
        ("u1", "banana", 10),
        ("u1", "cherry", 20),
        ("u2", "apple", 40),
        ("u1", "date", 10),
        ("u2", "banana", 40),
        ("u1", "elder", 30),
        ("u3", "fig", 5),
    ]
    root = write_inter(tmp_path / "data", "toy", rows)
    data = load_sequences(root, "toy")
    assert data.has_timestamps
    assert (data.n_users, data.n_items, data.n_interactions) == (3, 7, 9)
    assert data.item_tokens[0] == "[PAD]"
    assert sorted(data.item_tokens[1:]) == sorted({r[1] for r in rows})
    assert len(set(data.item_tokens)) == len(data.item_tokens)
    assert sorted(data.items.unique().tolist()) == list(range(1, 8))
    assert data.items.dtype == torch.int64 and data.times.dtype == torch.float64
    assert data.offsets.tolist()[0] == 0 and data.offsets.tolist()[-1] == 9
    seqs = user_seqs(data)
    assert set(data.user_tokens) == {"u1", "u2", "u3"}
    assert seqs["u1"] == (["banana", "date", "cherry", "apple", "elder"], [10.0, 10.0, 20.0, 30.0, 30.0])
    assert seqs["u2"] == (["kiwi", "apple", "banana"], [30.0, 40.0, 40.0])
    assert seqs["u3"] == (["fig"], [5.0])
    # u1: 10,10 and 30,30 -> 2; u2: 40,40 -> 1; u1's last 30 vs u2's first 30 is not a tie
    assert data.timestamp_ties() == 3
    assert data.summary()["timestamp_ties"] == 3
    # gaps within each user only: u1 0,10,10,0; u2 10,0; u3 none
    assert sorted(data.gaps().tolist()) == [0.0, 0.0, 0.0, 10.0, 10.0, 10.0]
    assert data.summary()["gap_seconds"] == {"p25": 0.0, "p50": 5.0, "p75": 10.0, "p90": 10.0, "p99": 10.0}


def test_format_seconds_for_people():
    from athwe.dataset.sequences import format_seconds

    assert [format_seconds(s) for s in (0, 37, 90, 3 * 3600, 3.7 * 86400, 30 * 86400, 2 * 365.25 * 86400)] == [
        "0 s", "37 s", "1.5 min", "3 h", "3.7 d", "30 d", "2 y"]


def test_load_atomic_stable_sort_many_ties(tmp_path, cache_dir):
    rng = np.random.default_rng(3)
    rows = []
    for n in range(400):
        rows.append((f"u{rng.integers(0, 12)}", f"i{n}", int(rng.integers(0, 4))))  # heavy ties
    root = write_inter(tmp_path / "data", "ties", rows)
    data = load_sequences(root, "ties")
    seqs = user_seqs(data)
    want_ties = 0
    for u in {r[0] for r in rows}:
        mine = [(t, i) for (uu, i, t) in rows if uu == u]
        expect = sorted(mine, key=lambda x: x[0])  # Python's sort is stable
        assert seqs[u] == ([i for _, i in expect], [float(t) for t, _ in expect]), u
        want_ties += sum(1 for a, b in zip(expect, expect[1:]) if a[0] == b[0])
    assert data.timestamp_ties() == want_ties


def test_load_atomic_without_timestamp_uses_positions(tmp_path, cache_dir):
    root = write_inter(tmp_path / "data", "nots", [("a", "x"), ("b", "y"), ("a", "z"), ("a", "x")],
                       header="user_id:token\titem_id:token")
    data = load_sequences(root, "nots")
    assert not data.has_timestamps and data.timestamp_ties() == 0
    assert data.gaps().numel() == 0 and data.summary()["gap_seconds"] == {}
    seqs = user_seqs(data)
    assert seqs["a"] == (["x", "z", "x"], [0.0, 1.0, 2.0])
    assert seqs["b"] == (["y"], [0.0])


def test_load_errors(tmp_path, cache_dir):
    with pytest.raises(DataError, match="dataset folder not found"):
        load_sequences(tmp_path, "missing")
    (tmp_path / "hollow").mkdir()
    with pytest.raises(DataError, match="hollow.inter"):
        load_sequences(tmp_path, "hollow")
    root = write_inter(tmp_path / "d2", "strts", [("a", "x", "t1")],
                       header="user_id:token\titem_id:token\ttimestamp:token")
    with pytest.raises(DataError, match="timestamp"):
        load_sequences(root, "strts")


@pytest.mark.parametrize("header, col, typ", [
    ("user_id:token_seq\titem_id:token\ttimestamp:float", "user_id", "token_seq"),
    ("user_id:float\titem_id:token\ttimestamp:float", "user_id", "float"),
    ("user_id:token\titem_id:token_seq\ttimestamp:float", "item_id", "token_seq"),
    ("user_id:token\titem_id:float\ttimestamp:float", "item_id", "float"),
    ("uid:token\tiid:float_seq", "iid", "float_seq"),
])
def test_load_atomic_id_columns_must_be_tokens(tmp_path, cache_dir, header, col, typ):
    rows = [("1", "3", 10), ("1", "4", 20), ("2", "3", 30)]  # valid in every type
    rows = rows if "timestamp" in header else [r[:2] for r in rows]
    root = write_inter(tmp_path / "data", "typed", rows, header=header)
    with pytest.raises(DataError) as ei:
        load_sequences(root, "typed")
    assert str(ei.value) == f"{root / 'typed' / 'typed.inter'}: id column {col} must be typed token, not {typ}"


# ---------------------------------------------------------------------------- k-core


def test_kcore_reaches_fixed_point(tmp_path, cache_dir):
    # k = 2. Item p occurs once -> removed; then U1 has only q -> U1 removed; then q occurs once
    # (U2) -> q removed. U2 keeps r, s; U3 keeps r, s. A single pass would stop too early.
    rows = [("U1", "p", 1), ("U1", "q", 2),
            ("U2", "q", 1), ("U2", "r", 2), ("U2", "s", 3),
            ("U3", "r", 1), ("U3", "s", 2)]
    root = write_inter(tmp_path / "data", "kc", rows)
    full = load_sequences(root, "kc", kcore=0)
    assert (full.n_users, full.n_items, full.n_interactions) == (3, 4, 7)
    data = load_sequences(root, "kc", kcore=2)
    assert (data.n_users, data.n_items, data.n_interactions) == (2, 2, 4)
    assert sorted(data.user_tokens) == ["U2", "U3"]
    assert data.item_tokens[0] == "[PAD]" and sorted(data.item_tokens[1:]) == ["r", "s"]
    seqs = user_seqs(data)
    assert seqs["U2"] == (["r", "s"], [2.0, 3.0]) and seqs["U3"] == (["r", "s"], [1.0, 2.0])
    with pytest.raises(DataError, match="3-core"):
        load_sequences(root, "kc", kcore=3)
    with pytest.raises(ConfigError, match="kcore must be >= 0"):
        load_sequences(root, "kc", kcore=-1)


def reference_kcore(rows: list[tuple], k: int) -> list[tuple]:
    """Remove any under-k user or item one at a time until none is left (the unique k-core)."""
    rows = list(rows)
    while True:
        uc: dict = {}
        ic: dict = {}
        for u, i, _ in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        bad_u = next((u for u, c in uc.items() if c < k), None)
        if bad_u is not None:
            rows = [r for r in rows if r[0] != bad_u]
            continue
        bad_i = next((i for i, c in ic.items() if c < k), None)
        if bad_i is not None:
            rows = [r for r in rows if r[1] != bad_i]
            continue
        return rows


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kcore_matches_reference_on_random_data(tmp_path, cache_dir, k):
    rng = np.random.default_rng(k)
    rows = [(f"u{int(rng.zipf(1.6)) % 60}", f"i{int(rng.zipf(1.5)) % 80}", int(rng.integers(0, 1000)))
            for _ in range(700)]
    root = write_inter(tmp_path / "data", "rk", rows)
    data = load_sequences(root, "rk", kcore=k)
    kept = reference_kcore(rows, k)
    assert 0 < len(kept) < len(rows)
    assert data.n_interactions == len(kept)
    assert set(data.user_tokens) == {r[0] for r in kept}
    assert sorted(data.item_tokens[1:]) == sorted({r[1] for r in kept})
    seqs = user_seqs(data)
    for u in data.user_tokens:
        mine = sorted([(t, i) for (uu, i, t) in kept if uu == u], key=lambda x: x[0])
        assert seqs[u] == ([i for _, i in mine], [float(t) for t, _ in mine])


# ---------------------------------------------------------------------------- fingerprint and cache


def test_atomic_write_permissions_and_failure(tmp_path):
    from athwe.utils import atomic_path, atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = tmp_path / "table.md"
    atomic_write_text(target, "one\n")
    assert target.read_text() == "one\n"
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # as a direct write, not 0o600
    target.chmod(0o640)
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n" and target.stat().st_mode & 0o777 == 0o640  # a rewrite keeps the mode
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "two\n" and sorted(f.name for f in tmp_path.iterdir()) == ["plain.txt", "table.md"]


def test_hash_file_streams_the_whole_file(tmp_path):
    import hashlib

    from athwe.utils import hash_file

    blob = os.urandom((1 << 20) + 12345)  # spans two read chunks
    p = tmp_path / "blob.bin"
    p.write_bytes(blob)
    assert hash_file(p).hexdigest() == hashlib.sha256(blob).hexdigest()
    # an existing hash object keeps accumulating (several files into one fingerprint)
    h = hashlib.md5(b"prefix")
    assert hash_file(p, h) is h
    assert h.hexdigest() == hashlib.md5(b"prefix" + blob).hexdigest()


def test_fingerprint_stable_and_sensitive(tmp_path, cache_dir):
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "y", 1), ("b", "z", 3)]
    root = write_inter(tmp_path / "data", "fp", rows)
    fp1 = load_sequences(root, "fp").item_fingerprint
    fp2 = load_sequences(root, "fp").item_fingerprint  # from cache
    fp3 = load_sequences(root, "fp", use_cache=False).item_fingerprint
    assert fp1 == fp2 == fp3
    assert isinstance(fp1, str) and len(fp1) >= 8
    d = load_sequences(root, "fp")
    assert d.item_map() == {"fingerprint": fp1, "tokens": d.item_tokens}
    # same data in another folder / under another name: same item map, same fingerprint
    other = write_inter(tmp_path / "elsewhere", "fp2", rows)
    assert load_sequences(other, "fp2").item_fingerprint == fp1
    # one more item -> different map -> different fingerprint
    root3 = write_inter(tmp_path / "d3", "fp", rows + [("b", "w", 4)])
    assert load_sequences(root3, "fp").item_fingerprint != fp1
    # same items, different ids (file order changes first appearance) -> different fingerprint
    root4 = write_inter(tmp_path / "d4", "fp", list(reversed(rows)))
    d4 = load_sequences(root4, "fp")
    assert d4.item_tokens != d.item_tokens and d4.item_fingerprint != fp1


def test_cache_used_on_second_load_and_invalidated_on_change(tmp_path, cache_dir, monkeypatch):
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "y", 1), ("b", "z", 3), ("a", "z", 5)]
    root = write_inter(tmp_path / "data", "cc", rows)
    first = load_sequences(root, "cc")
    assert list(cache_dir.rglob("*.pt")), "nothing cached under ATHWE_CACHE_DIR"

    def boom(*a, **k):
        raise AssertionError("read_atomic called although the cache is valid")

    monkeypatch.setattr(seqmod, "read_atomic", boom)
    second = load_sequences(root, "cc")
    assert second.item_tokens == first.item_tokens and second.user_tokens == first.user_tokens
    assert torch.equal(second.items, first.items) and torch.equal(second.times, first.times)
    assert torch.equal(second.offsets, first.offsets)
    assert second.has_timestamps == first.has_timestamps and second.source == first.source
    # another kcore is another cache entry
    with pytest.raises(AssertionError, match="cache is valid"):
        load_sequences(root, "cc", kcore=2)
    # use_cache=False always parses
    with pytest.raises(AssertionError, match="cache is valid"):
        load_sequences(root, "cc", use_cache=False)

    calls = []
    original = read_atomic

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(seqmod, "read_atomic", counting)
    inter = root / "cc" / "cc.inter"
    # change with a different size
    with open(inter, "a", encoding="utf-8") as f:
        f.write("c\tw\t7\n")
    third = load_sequences(root, "cc")
    assert len(calls) == 1 and third.n_users == 3 and "w" in third.item_tokens
    assert load_sequences(root, "cc").n_users == 3 and len(calls) == 1  # cached again
    # same size, new content, new mtime
    st = inter.stat()
    text = inter.read_text().replace("c\tw\t7", "c\tv\t7")
    inter.write_text(text)
    os.utime(inter, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert inter.stat().st_size == st.st_size
    fourth = load_sequences(root, "cc")
    assert len(calls) == 2 and "v" in fourth.item_tokens and "w" not in fourth.item_tokens


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    a, b = tmp_path / "ca", tmp_path / "cb"
    root = write_inter(tmp_path / "data", "ev", [("a", "x", 1), ("a", "y", 2)])
    monkeypatch.setenv("ATHWE_CACHE_DIR", str(a))
    load_sequences(root, "ev")
    monkeypatch.setenv("ATHWE_CACHE_DIR", str(b))
    load_sequences(root, "ev", use_cache=False)
    assert list(a.rglob("*.pt")) and not b.exists()


# ============================================================================ load_sequences: BSARec .txt


def test_load_txt_keeps_ids(tmp_path, cache_dir):
    root = write_txt(tmp_path / "data", "bs", ["1 7 3 5", "2 3 9 2 7", "5 4 4"])
    data = load_sequences(root, "bs")
    assert not data.has_timestamps
    assert data.n_items == 9  # max id; ids 1, 6 and 8 are unused but exist
    assert data.item_tokens == ["[PAD]"] + [str(i) for i in range(1, 10)]
    assert data.item_tokens[7] == "7"
    assert data.user_tokens == ["1", "2", "5"]
    assert data.items.tolist() == [7, 3, 5, 3, 9, 2, 7, 4, 4]
    assert data.offsets.tolist() == [0, 3, 7, 9]
    assert data.times.tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 0.0, 1.0]
    assert data.timestamp_ties() == 0
    assert data.n_interactions == 9 and data.n_users == 3


# ============================================================================ build_split


def reference_split(data, n: int, preset: str):
    """specs/protocol.md written out per user with Python lists."""
    train, valid, test = [], {}, {}
    skipped = 0

    def pad(ids, ts):
        assert len(ids) <= n
        return tuple([0] * (n - len(ids)) + list(ids)), tuple([0.0] * (n - len(ts)) + list(ts))

    for u in range(data.n_users):
        a, b = int(data.offsets[u]), int(data.offsets[u + 1])
        s = data.items[a:b].tolist()
        t = data.times[a:b].tolist()
        if len(s) < 3:
            skipped += 1
            continue
        if preset == "bsarec":
            lo = max(0, len(s) - (n + 2))
            w, wt = s[lo:-2], t[lo:-2]
            for j in range(1, len(w) + 1):
                train.append((u, *pad(w[:j - 1], wt[:j - 1]), w[j - 1], wt[j - 1]))
        else:
            tr, trt = s[:-2], t[:-2]
            for j in range(1, len(tr)):
                lo = max(0, j - n)
                train.append((u, *pad(tr[lo:j], trt[lo:j]), tr[j], trt[j]))
        for store, cut in ((valid, len(s) - 2), (test, len(s) - 1)):
            lo = max(0, cut - n)
            ids, ts = pad(s[lo:cut], t[lo:cut])
            store[u] = (ids, ts, s[cut], t[cut], s[:cut])
    return train, valid, test, skipped


def split_rows(ss) -> list[tuple]:
    return [(int(ss.user[r]), tuple(ss.input_ids[r].tolist()), tuple(ss.timestamps[r].tolist()),
             int(ss.target[r]), float(ss.target_time[r])) for r in range(len(ss))]


def random_timed_dataset(root: Path, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        length = int(rng.choice([1, 2, 3, 4, 5, 8, 12, 17]))
        t = 1_600_000_000.0 + float(rng.integers(0, 100))
        for _ in range(length):
            rows.append((f"u{u}", f"i{int(rng.integers(0, 60))}", f"{t:.1f}"))
            t += float(rng.integers(0, 3)) * 0.5  # includes equal timestamps
    rng.shuffle(rows)
    return write_inter(root, name, [tuple(r) for r in rows])


@pytest.mark.parametrize("preset", ["bsarec", "recbole"])
@pytest.mark.parametrize("n", [1, 3, 5, 50])
def test_build_split_matches_reference(tmp_path, cache_dir, preset, n):
    root = random_timed_dataset(tmp_path / "data", "rs", seed=11)
    data = load_sequences(root, "rs")
    lengths = data.lengths
    assert int(lengths.max()) > n + 2 or n == 50  # truncation exercised for the small N
    assert int((lengths < 3).sum()) > 0
    sp = build_split(data, n, preset)
    train, valid, test, skipped = reference_split(data, n, preset)
    assert sp.preset == preset and sp.max_seq_length == n
    assert sp.skipped_users == skipped
    for ss in (sp.train, sp.valid, sp.test):
        assert ss.input_ids.shape[1] == n and ss.timestamps.shape == ss.input_ids.shape
        assert ss.input_ids.dtype == torch.int64 and ss.timestamps.dtype == torch.float64
        assert not torch.isnan(ss.timestamps).any() and not torch.isnan(ss.target_time).any()
        assert (ss.timestamps[ss.input_ids == 0] == 0.0).all()
        assert (ss.target > 0).all()
        # left padding: once a real item appears, no padding follows
        nz = (ss.input_ids != 0).long()
        assert (nz[:, 1:] >= nz[:, :-1]).all()
    assert sorted(split_rows(sp.train)) == sorted(train)
    assert len(sp.train) == len(train)
    for ss, ref in ((sp.valid, valid), (sp.test, test)):
        assert sorted(ss.user.tolist()) == sorted(ref) and len(ss) == len(ref)
        for r in range(len(ss)):
            u = int(ss.user[r])
            ids, ts, tgt, tgt_t, hist = ref[u]
            assert tuple(ss.input_ids[r].tolist()) == ids
            assert tuple(ss.timestamps[r].tolist()) == ts
            assert int(ss.target[r]) == tgt and float(ss.target_time[r]) == tgt_t
            rows, items = ss.history_of(torch.tensor([r]))
            assert rows.tolist() == [0] * len(hist)
            assert items.tolist() == hist  # full, untruncated history
        # history_of on many rows at once (as evaluate uses it)
        rows_all = torch.arange(len(ss))
        ro, it = ss.history_of(rows_all)
        want = [(i, x) for i in range(len(ss)) for x in ref[int(ss.user[i])][4]]
        assert list(zip(ro.tolist(), it.tolist())) == want
        sub = torch.arange(3, min(len(ss), 9))
        ro, it = ss.history_of(sub)
        want = [(j, x) for j, i in enumerate(sub.tolist()) for x in ref[int(ss.user[i])][4]]
        assert list(zip(ro.tolist(), it.tolist())) == want


def test_build_split_hand_example(tmp_path, cache_dir):
    # one user, items a..f = 1..6 (BSARec ids), plus two short users that are skipped
    root = write_txt(tmp_path / "data", "hand", ["1 1 2 3 4 5 6", "2 1 2", "3 4"])
    data = load_sequences(root, "hand")
    sp = build_split(data, 3, "bsarec")
    assert sp.skipped_users == 2
    # w = s[-5:-2] = [2, 3, 4]: ([] -> 2), ([2] -> 3), ([2, 3] -> 4)
    assert sp.train.input_ids.tolist() == [[0, 0, 0], [0, 0, 2], [0, 2, 3]]
    assert sp.train.target.tolist() == [2, 3, 4]
    assert sp.train.timestamps.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 2.0]]
    assert sp.train.target_time.tolist() == [1.0, 2.0, 3.0]
    assert sp.train.user.tolist() == [0, 0, 0]
    assert sp.valid.input_ids.tolist() == [[2, 3, 4]] and sp.valid.target.tolist() == [5]
    assert sp.test.input_ids.tolist() == [[3, 4, 5]] and sp.test.target.tolist() == [6]
    assert sp.valid.history_of(torch.tensor([0]))[1].tolist() == [1, 2, 3, 4]
    assert sp.test.history_of(torch.tensor([0]))[1].tolist() == [1, 2, 3, 4, 5]

    sp = build_split(data, 3, "recbole")
    # s[:-2] = [1, 2, 3, 4]: ([1] -> 2), ([1, 2] -> 3), ([1, 2, 3] -> 4)
    assert sp.train.input_ids.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3]]
    assert sp.train.target.tolist() == [2, 3, 4]
    assert sp.valid.input_ids.tolist() == [[2, 3, 4]] and sp.test.input_ids.tolist() == [[3, 4, 5]]
    with pytest.raises(ValueError):
        build_split(data, 3, "sasrec")


# ============================================================================ real shared data


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not available")


def test_lastfm_counts(cache_dir):
    _need(SHARED_DATA / "LastFM" / "LastFM.txt")
    data = load_sequences(SHARED_DATA, "LastFM")
    assert (data.n_users, data.n_items, data.n_interactions) == (1_090, 3_646, 52_551)
    assert data.source.endswith("LastFM.txt") and not data.has_timestamps


def test_ml100k_counts_and_5core(cache_dir):
    _need(SHARED_DATA / "ml-100k" / "ml-100k.inter")
    data = load_sequences(SHARED_DATA, "ml-100k")
    assert (data.n_users, data.n_items, data.n_interactions) == (943, 1_682, 100_000)
    assert data.has_timestamps
    # chronological within each user
    t = data.times
    starts = torch.zeros(len(t), dtype=torch.bool)
    starts[data.offsets[:-1]] = True
    assert ((t[1:] >= t[:-1]) | starts[1:]).all()
    k5 = load_sequences(SHARED_DATA, "ml-100k", kcore=5)
    assert (k5.n_users, k5.n_items, k5.n_interactions) == (943, 1_349, 99_287)
    assert int(k5.lengths.min()) >= 5
    assert int(torch.bincount(k5.items)[1:].min()) >= 5
