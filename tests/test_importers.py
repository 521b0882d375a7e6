"""athwe.dataset.importers: raw Amazon dumps (2014/2018/2023), RecBole folders and BSARec .txt
files -> a dataset folder that load_sequences and read_atomic read back exactly."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from athwe.dataset.atomic import read_atomic
from athwe.dataset.importers import (
    ITEM_HEADER,
    category_tokens,
    clean_text,
    detect_format,
    find_meta_file,
    format_number,
    import_dataset,
)
from athwe.dataset.sequences import load_sequences
from athwe.errors import DataError
import fixtures_amazon as fx

WRITERS = {"2014": fx.write_amazon2014, "2018": fx.write_amazon2018, "2023": fx.write_amazon2023}


def expected_sequences(rows: list[tuple]) -> dict[str, tuple[list[str], list[float]]]:
    """user -> (items, times): each user's rows stably sorted by time (ties keep file order)."""
    by_user: dict[str, list[tuple]] = {}
    for row in rows:
        by_user.setdefault(row[0], []).append(row)
    out = {}
    for u, rs in by_user.items():
        rs = sorted(rs, key=lambda r: r[3])
        out[u] = ([r[1] for r in rs], [r[3] for r in rs])
    return out


def loaded_sequences(data) -> dict[str, tuple[list[str], list[float]]]:
    out = {}
    for u, tok in enumerate(data.user_tokens):
        a, b = int(data.offsets[u]), int(data.offsets[u + 1])
        out[tok] = ([data.item_tokens[i] for i in data.items[a:b].tolist()], data.times[a:b].tolist())
    return out


def kcore_reference(rows: list[tuple], k: int) -> list[tuple]:
    rows = list(rows)
    while True:
        uc: dict[str, int] = {}
        ic: dict[str, int] = {}
        for r in rows:
            uc[r[0]] = uc.get(r[0], 0) + 1
            ic[r[1]] = ic.get(r[1], 0) + 1
        new = [r for r in rows if uc[r[0]] >= k and ic[r[1]] >= k]
        if len(new) == len(rows):
            return new
        rows = new


def first_appearance(rows: list[tuple]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r[1], None)
    return list(seen)


def read_meta_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# ============================================================================ Amazon round trips


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("gen", ["2014", "2018", "2023"])
def test_amazon_round_trip(tmp_path, gen, gz):
    exp = WRITERS[gen](tmp_path / "raw", gz=gz)
    out = tmp_path / "data"
    s = import_dataset(exp["reviews"], out, "kt", meta=exp["meta"])
    rows = exp["interactions"]
    assert s["format"] == f"amazon{gen}"
    assert (s["users"], s["items"], s["interactions"]) == (5, 7, 14)
    assert s["lines_read"] == len(fx.REVIEWS) and s["duplicates_dropped"] == 1
    assert s["items_without_metadata"] == 1 and s["items_with_metadata"] == 6
    assert s["items_without_image_url"] == 2  # B003 has no image, B009NOMETA no metadata at all
    assert s["meta_duplicates"] == 1 and s["bad_lines"] == 0
    assert s["timestamp_ties"] == 1 and s["has_ratings"] and s["has_timestamps"]
    folder = out / "kt"
    assert sorted(os.listdir(folder)) == ["kt.import.json", "kt.inter", "kt.item", "kt.meta.jsonl"]
    assert json.loads((folder / "kt.import.json").read_text())["interactions"] == 14
    assert leftovers(out) == ["kt"]

    # interactions: exact values, file order, seconds (2023 milliseconds divided by 1000)
    inter = read_atomic(folder / "kt.inter")
    assert inter.names == ["user_id", "item_id", "rating", "timestamp"]
    assert list(zip(inter.columns["user_id"], inter.columns["item_id"], inter.columns["rating"].tolist(),
                    inter.columns["timestamp"].tolist())) == rows
    if gen == "2023":
        text = (folder / "kt.inter").read_text()
        assert "\t1300000100.25\n" in text and "\t1300000400.123\n" in text and "\t1300000300\n" in text

    data = load_sequences(out, "kt", use_cache=False)
    assert data.has_timestamps and data.n_users == 5 and data.n_items == 7 and data.n_interactions == 14
    assert loaded_sequences(data) == expected_sequences(rows)
    assert data.item_tokens[1:] == first_appearance(rows)
    assert loaded_sequences(data)["A1USER"][0] == ["B001", "B002", "B003", "B005"]  # tie: file order

    # metadata: .meta.jsonl exact, .item the documented one-line encoding
    recs = exp["meta_records"]
    order = [i for i in first_appearance(rows) if i not in fx.NO_META]
    assert read_meta_jsonl(folder / "kt.meta.jsonl") == [recs[i] for i in order]
    table = read_atomic(folder / "kt.item")
    assert "\t".join(f"{n}:{table.types[n]}" for n in table.names) == "\t".join(ITEM_HEADER)
    assert table.columns["item_id"] == order
    for n, item in enumerate(order):
        m = recs[item]
        assert table.columns["title"][n] == m["title"].split()
        assert table.columns["description"][n] == m["description"].split()
        assert table.columns["brand"][n] == " ".join(m["brand"].split())
        first = m["categories"][0] if m["categories"] else []
        assert table.columns["categories"][n] == ["_".join(level.split()) for level in first]
        assert table.columns["image_url"][n] == (m["image_urls"][0] if m["image_urls"] else "")
    for line in (folder / "kt.item").read_text(encoding="utf-8").split("\n")[1:-1]:
        assert line.count("\t") == len(ITEM_HEADER) - 1


def test_amazon_metadata_specifics(tmp_path):
    e14 = fx.write_amazon2014(tmp_path / "a", gz=True)
    import_dataset(e14["reviews"], tmp_path / "d", "k14", meta=e14["meta"])
    m = {r["item"]: r for r in read_meta_jsonl(tmp_path / "d" / "k14" / "k14.meta.jsonl")}
    assert m["B001"]["categories"] == [["Home & Kitchen", "Kitchen & Dining", "Coffee  Mugs"], ["Gifts", "For Him"]]
    assert m["B001"]["title"] == "Café Crème Mug — 350 ml"  # the first record, not the duplicate
    assert m["B003"]["title"] == 'Bob\'s "Best" Kettle' and m["B003"]["image_urls"] == []
    item = read_atomic(tmp_path / "d" / "k14" / "k14.item")
    row = item.columns["item_id"].index("B001")
    assert item.columns["categories"][row] == ["Home_&_Kitchen", "Kitchen_&_Dining", "Coffee_Mugs"]
    assert item.columns["brand"][row] == "Acme Home"

    e18 = fx.write_amazon2018(tmp_path / "b", gz=False)
    import_dataset(e18["reviews"], tmp_path / "d", "k18", meta=e18["meta"])
    m = {r["item"]: r for r in read_meta_jsonl(tmp_path / "d" / "k18" / "k18.meta.jsonl")}
    assert m["B001"]["image_urls"] == [f"{fx.IMG}/B001-0.jpg", f"{fx.IMG}/B001-0._SS40_.jpg",
                                       f"{fx.IMG}/B001-1.jpg", f"{fx.IMG}/B001-1._SS40_.jpg"]
    assert m["B001"]["description"] == "A sturdy mug.\tDishwasher safe.\nMicrowave safe."

    e23 = fx.write_amazon2023(tmp_path / "c", gz=True)
    import_dataset(e23["reviews"], tmp_path / "d", "k23", meta=e23["meta"])
    m = {r["item"]: r for r in read_meta_jsonl(tmp_path / "d" / "k23" / "k23.meta.jsonl")}
    assert m["B001"]["image_urls"][:3] == [f"{fx.IMG}/B001-1._AC_.jpg", f"{fx.IMG}/B001-1._AC_SL1500_.jpg",
                                           f"{fx.IMG}/B001-1._AC_US40_.jpg"]  # MAIN variant first
    assert m["B006"]["brand"] == "Pan Co"  # from details when store is empty
    assert m["B004"]["categories"] == [] and m["B004"]["brand"] == "Ünïcode Brand"
    item = read_atomic(tmp_path / "d" / "k23" / "k23.item")
    row = item.columns["item_id"].index("B004")
    assert item.columns["title"][row] == ["Knife", "Block"]
    assert item.columns["description"][row] == ["Line", "one", "Line", "two", "Line", "three"]
    assert item.columns["categories"][row] == []


def test_meta_found_next_to_reviews(tmp_path):
    for gen, write in WRITERS.items():
        exp = write(tmp_path / gen, gz=gen != "2018")
        assert find_meta_file(exp["reviews"]) == exp["meta"]
        s = import_dataset(exp["reviews"], tmp_path / "d", f"x{gen}")
        assert s["meta"] == str(exp["meta"]) and s["items_with_metadata"] == 6
    exp = fx.write_amazon2018(tmp_path / "alone", gz=True)
    exp["meta"].unlink()
    s = import_dataset(exp["reviews"], tmp_path / "d", "nometa")
    assert s["meta"] is None and s["items_without_metadata"] == 7 and s["items_without_image_url"] == 7
    assert not (tmp_path / "d" / "nometa" / "nometa.item").exists()
    assert load_sequences(tmp_path / "d", "nometa", use_cache=False).n_interactions == 14


def test_detect_format(tmp_path):
    assert detect_format(fx.write_amazon2014(tmp_path / "a", gz=True)["reviews"]) == "amazon2014"
    assert detect_format(fx.write_amazon2018(tmp_path / "b", gz=False)["reviews"]) == "amazon2018"
    e23 = fx.write_amazon2023(tmp_path / "c", gz=True)
    assert detect_format(e23["reviews"]) == "amazon2023"
    assert detect_format(fx.write_amazon2023_csv(tmp_path / "c2")["reviews"]) == "amazon2023"
    assert detect_format(fx.write_atomic_folder(tmp_path / "f")["folder"]) == "atomic"
    assert detect_format(fx.write_txt(tmp_path / "t")) == "txt"
    with pytest.raises(DataError, match=r"meta_Kitchen_Test\.jsonl\.gz:1: .*metadata file"):
        import_dataset(e23["meta"], tmp_path / "d", "x")
    with pytest.raises(DataError, match="unknown format"):
        import_dataset(e23["reviews"], tmp_path / "d", "x", fmt="amazon2099")


def test_csv_2023(tmp_path):
    exp = fx.write_amazon2023_csv(tmp_path / "raw", gz=True)
    s = import_dataset(exp["reviews"], tmp_path / "d", "csv")
    assert s["format"] == "amazon2023" and s["interactions"] == 14 and s["duplicates_dropped"] == 1
    data = load_sequences(tmp_path / "d", "csv", use_cache=False)
    assert loaded_sequences(data) == expected_sequences(exp["interactions"])


# ============================================================================ k-core


@pytest.mark.parametrize("k", [2])
def test_kcore(tmp_path, k):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=True)
    s = import_dataset(exp["reviews"], tmp_path / "d", "k", meta=exp["meta"], kcore=k)
    rows = kcore_reference(exp["interactions"], k)
    assert rows and len(rows) < len(exp["interactions"])
    assert s["interactions"] == len(rows) and s["removed_by_kcore"] == len(exp["interactions"]) - len(rows)
    data = load_sequences(tmp_path / "d", "k", use_cache=False)
    assert loaded_sequences(data) == expected_sequences(rows)
    items = first_appearance(rows)
    assert data.item_tokens[1:] == items
    lens = data.lengths.tolist()
    assert min(lens) >= k
    assert read_atomic(tmp_path / "d" / "k" / "k.item").columns["item_id"] == [i for i in items if i not in fx.NO_META]
    assert [r["item"] for r in read_meta_jsonl(tmp_path / "d" / "k" / "k.meta.jsonl")] == \
        [i for i in items if i not in fx.NO_META]


def test_kcore_removing_everything_fails_cleanly(tmp_path):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=True)
    with pytest.raises(DataError, match="no interactions left after 50-core"):
        import_dataset(exp["reviews"], tmp_path / "d", "k", kcore=50)
    assert leftovers(tmp_path / "d") == []


# ============================================================================ malformed input, atomicity


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_malformed_line_names_file_and_line(tmp_path, gz):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=gz)
    lines = (gzip.decompress(exp["reviews"].read_bytes()) if gz else exp["reviews"].read_bytes()).decode().splitlines()
    lines[2] = lines[2][:-5]  # cut: invalid JSON on line 3
    bad = fx.write_lines(exp["reviews"], lines, gz)
    out = tmp_path / "d"
    with pytest.raises(DataError) as ei:
        import_dataset(bad, out, "bad", meta=exp["meta"])
    assert str(ei.value).startswith(f"{bad}:3: ")
    assert "\n" not in str(ei.value)
    assert leftovers(out) == []  # no dataset folder, no temporary folder


def test_malformed_variants(tmp_path):
    out = tmp_path / "d"
    base = {"reviewerID": "U1", "asin": "I1", "overall": 5.0, "unixReviewTime": 1300000000}
    cases = [
        (dict(base, unixReviewTime="soon"), "field 'unixReviewTime' value 'soon' is not a number"),
        ({k: v for k, v in base.items() if k != "asin"}, "missing field 'asin'"),
        (dict(base, reviewerID="U\t1"), "contains a tab or line break"),
        (dict(base, overall=True), "field 'overall' value True is not a number"),
    ]
    for n, (rec, msg) in enumerate(cases):
        p = fx.write_lines(tmp_path / f"r{n}.json", [repr(base), repr(rec)], gz=False)
        with pytest.raises(DataError, match=rf"r{n}\.json:2: .*{msg}"):
            import_dataset(p, out, "x", fmt="amazon2014")
    # literal_eval, never eval: an expression is a malformed line, and it is not executed
    marker = tmp_path / "executed"
    evil = "{'reviewerID': 'U2', 'asin': __import__('pathlib').Path(%r).touch(), 'unixReviewTime': 1}" % str(marker)
    p = fx.write_lines(tmp_path / "evil.json", [repr(base), evil], gz=False)
    with pytest.raises(DataError, match=r"evil\.json:2: not a JSON object or Python-literal dict"):
        import_dataset(p, out, "x")
    assert not marker.exists()
    p.write_bytes(repr(base).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(DataError, match=r"evil\.json:2: not UTF-8"):
        import_dataset(p, out, "x")
    assert leftovers(out) == []


def test_skip_bad_lines_counts_them(tmp_path):
    exp = fx.write_amazon2014(tmp_path / "raw", gz=True)
    lines = gzip.decompress(exp["reviews"].read_bytes()).decode().splitlines()
    lines.insert(3, "{'reviewerID': 'broken'")
    lines.append("not a dict at all")
    fx.write_lines(exp["reviews"], lines, gz=True)
    with pytest.raises(DataError, match=":4: "):
        import_dataset(exp["reviews"], tmp_path / "d", "s", meta=exp["meta"])
    s = import_dataset(exp["reviews"], tmp_path / "d", "s", meta=exp["meta"], skip_bad_lines=True)
    assert s["bad_lines"] == 2 and s["interactions"] == 14 and s["lines_read"] == len(fx.REVIEWS) + 2
    assert s["bad_line_examples"][0].endswith(":4: not a JSON object or Python-literal dict")


def test_truncated_gzip(tmp_path):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=True)
    data = exp["reviews"].read_bytes()
    exp["reviews"].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"Kitchen_Test_5\.json\.gz:\d+: corrupt or truncated"):
        import_dataset(exp["reviews"], tmp_path / "d", "t", meta=exp["meta"])
    assert leftovers(tmp_path / "d") == []


def test_bad_metadata_line_leaves_nothing(tmp_path):
    exp = fx.write_amazon2023(tmp_path / "raw", gz=False)
    lines = exp["meta"].read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace('"parent_asin": "B001"', '"parent_asin": "B001", oops')
    exp["meta"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"meta_Kitchen_Test\.jsonl:2: "):
        import_dataset(exp["reviews"], tmp_path / "d", "m", meta=exp["meta"])
    assert leftovers(tmp_path / "d") == []


def test_existing_folder_needs_overwrite_and_survives_a_failed_import(tmp_path):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=True)
    out = tmp_path / "d"
    import_dataset(exp["reviews"], out, "k", meta=exp["meta"])
    (out / "k" / "images").mkdir()
    (out / "k" / "images" / "B001.jpg").write_bytes(b"jpeg")
    before = (out / "k" / "k.inter").read_bytes()
    with pytest.raises(DataError, match="already exists"):
        import_dataset(exp["reviews"], out, "k", meta=exp["meta"], kcore=2)
    bad = fx.write_lines(tmp_path / "bad.json", ['{"reviewerID": "U", "asin": "I"}'], gz=False)
    with pytest.raises(DataError, match=r"bad\.json:1: missing field 'unixReviewTime'"):
        import_dataset(bad, out, "k", fmt="amazon2018", overwrite=True)
    assert (out / "k" / "k.inter").read_bytes() == before and leftovers(out) == ["k"]
    s = import_dataset(exp["reviews"], out, "k", meta=exp["meta"], kcore=2, overwrite=True)
    assert s["kcore"] == 2 and (out / "k" / "k.inter").read_bytes() != before
    assert (out / "k" / "images" / "B001.jpg").read_bytes() == b"jpeg"  # downloads are kept
    assert leftovers(out) == ["k"]


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x\ty"])
def test_invalid_names(tmp_path, name):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=True)
    with pytest.raises(DataError, match="invalid dataset name"):
        import_dataset(exp["reviews"], tmp_path / "d", name)


# ============================================================================ atomic folders, .txt


def test_atomic_folder(tmp_path):
    src = fx.write_atomic_folder(tmp_path / "raw", "src")
    out = tmp_path / "d"
    s = import_dataset(src["folder"], out, "norm")
    assert s["format"] == "atomic" and s["duplicates_dropped"] == 1 and s["interactions"] == 14
    (tmp_path / "plain").mkdir()  # the mode a plain mkdir gives under this umask, not mkdtemp's 0o700
    assert (out / "norm").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    inter = read_atomic(out / "norm" / "norm.inter")
    assert inter.names == ["user_id", "item_id", "rating", "timestamp"]
    assert list(zip(inter.columns["user_id"], inter.columns["item_id"], inter.columns["rating"].tolist(),
                    inter.columns["timestamp"].tolist())) == src["interactions"]
    item = read_atomic(out / "norm" / "norm.item")
    assert item.names == ["item_id", "movie_title", "year", "class"]
    kept = [i for i in first_appearance(src["interactions"])]
    assert sorted(item.columns["item_id"]) == sorted(i for i in kept if i not in fx.NO_META)
    assert item.columns["movie_title"][item.columns["item_id"].index("B001")] == ["Title", "0"]  # first row wins
    user = read_atomic(out / "norm" / "norm.user")
    assert sorted(user.columns["user_id"]) == ["A1USER", "A2USER", "A3USER", "A4USER", "A5ONE"]
    assert s["items_without_metadata"] == 1
    data = load_sequences(out, "norm", use_cache=False)
    assert loaded_sequences(data) == expected_sequences(src["interactions"])
    # the .inter file alone, with k-core
    s = import_dataset(src["folder"] / "src.inter", out, "k2", kcore=2)
    assert s["interactions"] == len(kcore_reference(src["interactions"], 2))


def test_txt(tmp_path):
    p = fx.write_txt(tmp_path / "raw", "seq")
    out = tmp_path / "d"
    s = import_dataset(p, out, "seq")
    assert s["format"] == "txt" and not s["has_timestamps"] and s["duplicates_dropped"] == 0
    assert (out / "seq" / "seq.inter").read_text().splitlines()[0] == "user_id:token\titem_id:token"
    data = load_sequences(out, "seq", use_cache=False)
    assert not data.has_timestamps
    got = {u: items for u, (items, _) in loaded_sequences(data).items()}
    assert got == {line.split()[0]: line.split()[1:] for line in fx.TXT_LINES}  # repeats (7 .. 7) kept
    s = import_dataset(p.parent, out, "seq2", kcore=2)  # the folder works too
    ref = kcore_reference([(ln.split()[0], it) for ln in fx.TXT_LINES for it in ln.split()[1:]], 2)
    assert ref == [("3", "7"), ("3", "7")]
    assert (s["users"], s["items"], s["interactions"]) == (1, 1, 2)


def test_txt_not_utf8_leaves_nothing(tmp_path):
    p = tmp_path / "raw" / "bin.txt"
    p.parent.mkdir()
    p.write_bytes(b"1 2 3\n\xff\xfe 4\n")
    with pytest.raises(DataError) as ei:
        import_dataset(p, tmp_path / "d", "e")
    assert str(ei.value) == f"{p}:2: not UTF-8 text (invalid start byte at byte 1 of the line); save the file as UTF-8"
    assert not (tmp_path / "d").exists()  # not even the new --data-dir folder
    (tmp_path / "keep").mkdir()
    with pytest.raises(DataError):
        import_dataset(p, tmp_path / "keep" / "a" / "b", "e")
    assert leftovers(tmp_path / "keep") == []  # the folders it created are gone, the one that existed stays


@pytest.mark.parametrize("ext, header", [
    ("inter", "timestamp:float\tuser_id:token_seq\titem_id:token\trating:float\tlabel:float"),
    ("inter", "timestamp:float\tuser_id:token\titem_id:token_seq\trating:float\tlabel:float"),
    ("item", "item_id:token_seq\tmovie_title:token_seq\tyear:float\tclass:token_seq"),
    ("user", "user_id:token_seq\tage:float"),
])
def test_atomic_id_columns_must_be_tokens(tmp_path, ext, header):
    src = fx.write_atomic_folder(tmp_path / "raw", "src")
    path = src["folder"] / f"src.{ext}"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([header] + lines[1:]) + "\n", encoding="utf-8")
    col = next(h.split(":")[0] for h in header.split("\t") if h.endswith("_id:token_seq"))
    with pytest.raises(DataError) as ei:
        import_dataset(src["folder"], tmp_path / "d", "norm")
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and f"column {col} must be typed token, not token_seq" in msg, msg
    assert leftovers(tmp_path / "d") == []


def test_meta_only_for_amazon(tmp_path):
    p = fx.write_txt(tmp_path / "raw", "seq")
    with pytest.raises(DataError, match="--meta applies to Amazon"):
        import_dataset(p, tmp_path / "d", "seq", meta=p)


# ============================================================================ encodings

BOM = b"\xef\xbb\xbf"


def _add_bom(path: Path) -> None:
    """Prepend a UTF-8 byte-order mark to a text file (inside the compression for .gz)."""
    if path.name.endswith(".gz"):
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(BOM + data))
    else:
        path.write_bytes(BOM + path.read_bytes())


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.endswith(".import.json")}


def _bom_sources(kind: str, raw: Path) -> tuple[Path, list[Path], dict]:
    """(source to import, the files to give a BOM, import options) for one kind of source."""
    if kind in ("2014", "2018", "2023", "2023-plain"):
        exp = WRITERS[kind[:4]](raw, gz=kind != "2023-plain")
        return exp["reviews"], [exp["reviews"], exp["meta"]], {"meta": exp["meta"]}
    if kind == "csv":
        exp = fx.write_amazon2023_csv(raw)
        return exp["reviews"], [exp["reviews"]], {}
    if kind == "atomic":
        folder = fx.write_atomic_folder(raw)["folder"]
        meta = folder / "src.meta.jsonl"
        meta.write_text('{"item": "B001", "categories": [["A"]]}\n', encoding="utf-8")
        return folder, [folder / "src.inter", folder / "src.item", folder / "src.user", meta], {}
    return fx.write_txt(raw), [raw / "seq.txt"], {}


@pytest.mark.parametrize("kind", ["2014", "2018", "2023", "2023-plain", "csv", "atomic", "txt"])
def test_utf8_bom_in_every_source_imports_like_plain_utf8(tmp_path, kind):
    """Spreadsheet tools save UTF-8 with a byte-order mark: each importer input (reviews, metadata,
    .inter/.item/.user/.meta.jsonl, .txt, CSV) with one gives byte-for-byte the same dataset."""
    source, files, opts = _bom_sources(kind, tmp_path / "raw")
    plain = import_dataset(source, tmp_path / "out", "plain", **opts)
    for f in files:
        _add_bom(f)
    assert all(f.read_bytes()[:3] in (BOM, b"\x1f\x8b\x08") for f in files)
    with_bom = import_dataset(source, tmp_path / "out", "bom", **opts)
    assert with_bom["format"] == plain["format"] and with_bom["interactions"] == plain["interactions"]
    got, want = _outputs(tmp_path / "out" / "bom"), _outputs(tmp_path / "out" / "plain")
    assert {k.replace("bom", "plain"): v for k, v in got.items()} == want
    assert all(not v.startswith(BOM) for v in got.values())  # what athwe writes has no BOM


def test_utf16_and_latin1_sources_are_one_line_errors(tmp_path):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=False)
    text = exp["reviews"].read_text(encoding="utf-8")
    exp["reviews"].write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError) as ei:
        import_dataset(exp["reviews"], tmp_path / "out", "x", meta=exp["meta"])
    path = exp["reviews"]
    assert str(ei.value) == f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    lines = text.splitlines()
    exp["reviews"].write_bytes(("\n".join(lines[:2]) + "\n").encode() + b'{"reviewerID": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r":3: not UTF-8 text \(invalid continuation byte at byte 20 of the line\)"):
        import_dataset(exp["reviews"], tmp_path / "out", "x", meta=exp["meta"])
    assert not (tmp_path / "out").exists()


# ============================================================================ helpers


def test_helpers():
    assert clean_text(" a\tb\n\nc\r\n d\u2028e\x00f ") == "a b c d e f"
    assert clean_text(None) == ""
    assert category_tokens(["Home & Kitchen", " ", "Coffee\tMugs "]) == ["Home_&_Kitchen", "Coffee_Mugs"]
    assert format_number(5.0) == "5" and format_number(1300000400.123) == "1300000400.123"
    assert format_number(1588687728923 / 1000) == "1588687728.923" and format_number(4.5) == "4.5"
