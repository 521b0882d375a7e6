"""Import raw interaction data into a dataset folder that `load_sequences` and the feature
extractor read: raw Amazon review dumps (2014, 2018, 2023), RecBole atomic folders and
BSARec/WEARec `.txt` sequence files.

`import_dataset(source, out_dir, name)` writes `out_dir/name/`:

* `name.inter`  `user_id:token  item_id:token  [rating:float]  [timestamp:float]`, one interaction
  per line in source file order (minus dropped lines). Timestamps are Unix seconds (Amazon 2023
  milliseconds are divided by 1000, e.g. `1588687728.923`); integral values are written without
  a fractional part. The rating column is written only when every kept interaction has one; the
  timestamp column only when the source has timestamps (not for `.txt`).
* `name.item`   `item_id:token  title:token_seq  categories:token_seq  brand:token
  description:token_seq  image_url:token`, one row per item that appears in `name.inter` AND has
  a metadata record, in order of the item's first interaction. Items without metadata have no
  row (they are counted in the summary; the extractor masks them).
* `name.meta.jsonl`  the same items, losslessly: one JSON object per line
  `{"item", "title", "categories": [[level, ...], ...], "brand", "description", "image_urls"}`.
* `name.import.json`  the summary returned by `import_dataset` (counts, format, options).

Encoding of `.item` fields (atomic files are tab-separated and line-based, so no field may hold
a tab or a line break):

* text (`title`, `description`, `brand`): control characters become spaces and every run of
  whitespace (tabs, newlines, non-breaking spaces, ...) becomes one space; leading and trailing
  whitespace is dropped. Nothing else changes (HTML entities such as `&amp;` stay as in the dump;
  cleaning is the extractor's job). `title`/`description` are token_seq, so a reader splits them
  into words; `brand` is one token that may contain single spaces.
* `categories`: the FIRST category path only (what upstream HM4SR/ATHWE used), top level first,
  one token per level, whitespace inside a level replaced by `_` (`Home & Kitchen` ->
  `Home_&_Kitchen`), empty levels dropped. This matches the bundled demo dataset's
  `categories:token_seq`. All paths, unaltered, are in `name.meta.jsonl`.
  Amazon 2014 `categories` is a list of paths; 2018 `category` and 2023 `categories` are one
  flat list (one path).
* `image_url`: the first candidate of `image_urls` (empty when there is none).
  Candidate order: 2014 `imUrl`; 2018 `imageURLHighRes[k]` then `imageURL[k]` for k = 0, 1, ...
  (high-res first; `imageURL` holds small thumbnails); 2023 per image (the `MAIN` variant first)
  `large`, `hi_res`, `thumb`. Duplicates are removed, order kept.

In `name.meta.jsonl` `title` and `brand` are the raw strings (2023: `store`, or
`details["Brand"]` when `store` is empty), `description` is the raw string (lists of paragraphs,
as in 2018/2023, joined with "\\n"), `categories` the list of paths as in the dump.

Interactions: exact duplicates (same user, item and timestamp) are dropped, the first kept; all
other repeats are kept. Optional k-core filtering (users and items with >= k interactions,
iterated to a fixed point) runs after de-duplication. The 2023 item id is `parent_asin` (variants
of one product are one item). Files may be gzip-compressed (detected by content, not name).
Malformed lines raise `DataError("path:line: problem")`; with `skip_bad_lines=True` they are
skipped and counted. Everything is built in a temporary folder next to the destination and
renamed into place at the end, so a failure never leaves a partial dataset folder.
"""
from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from athwe.dataset.atomic import BOM, open_text, read_atomic, read_sequence_txt
from athwe.errors import DataError
from athwe.utils import temp_dir

FORMATS = ("auto", "amazon2014", "amazon2018", "amazon2023", "atomic", "txt")
AMAZON_FORMATS = ("amazon2014", "amazon2018", "amazon2023")
ITEM_HEADER = ("item_id:token", "title:token_seq", "categories:token_seq", "brand:token",
               "description:token_seq", "image_url:token")
MAX_BAD_LINE_EXAMPLES = 5

# control characters (C0, DEL, C1) -> space; whitespace runs are collapsed afterwards
_CONTROL = {c: " " for c in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0))}
_ID_FORBIDDEN = re.compile(r"[\t\n\r\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")


# ---------------------------------------------------------------------------------------------
# small helpers


def clean_text(value: Any) -> str:
    """One line of text: control characters and whitespace runs become single spaces."""
    if value is None:
        return ""
    return " ".join(str(value).translate(_CONTROL).split())


def category_tokens(path: list[str]) -> list[str]:
    """One category path as tokens: whitespace inside a level becomes `_`, empty levels dropped."""
    out = []
    for level in path:
        tok = "_".join(clean_text(level).split())
        if tok:
            out.append(tok)
    return out


def format_number(x: float) -> str:
    """Integral floats without a fractional part (`5`, `1252800000`), others shortest-exact."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for reading bytes, transparently un-gzipping (detected by the magic bytes)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    if f.read(2) == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def _iter_lines(path: Path, progress: bool = False) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, decode error or None) for every non-blank line. Text is UTF-8; a
    byte-order mark at the start of the file is dropped, a UTF-16 file is refused at once. The
    progress bar shows on a terminal only, and a failed read clears it (the error is the one line)."""
    from tqdm import tqdm

    show = progress and sys.stderr.isatty()
    with _open_binary(path) as f, tqdm(desc=path.name, unit=" lines", disable=not show, mininterval=1.0) as bar:
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                bar.update(1)
                if lineno == 1:
                    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); "
                                        f"save it as UTF-8")
                    if raw[:3] == b"\xef\xbb\xbf":
                        raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, None, f"not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)"
                    continue
                if text.strip():
                    yield lineno, text, None
        except (EOFError, OSError, zlib.error) as e:
            bar.leave = False
            raise DataError(f"{path}:{lineno + 1}: corrupt or truncated compressed data ({e})") from None
        except BaseException:  # the caller's DataError arrives here as GeneratorExit
            bar.leave = False
            raise


def _parse_record(text: str) -> dict:
    """A JSON object, or a Python-literal dict (Amazon 2014; never eval). Raises ValueError."""
    s = text.strip()
    try:
        if s.startswith("{'"):  # a Python literal (2014): skip the JSON attempt
            raise ValueError
        rec = json.loads(s)
    except ValueError:
        try:
            rec = ast.literal_eval(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError("not a JSON object or Python-literal dict") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a dict/object, found {type(rec).__name__}")
    return rec


def _id_value(rec: dict, key: str) -> str:
    if key not in rec:
        raise ValueError(f"missing field {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"field {key!r} must be a string, found {type(v).__name__}")
    s = str(v).strip()
    if not s:
        raise ValueError(f"field {key!r} is empty")
    if _ID_FORBIDDEN.search(s):
        raise ValueError(f"field {key!r} value {s!r} contains a tab or line break")
    return s


def _number(rec: dict, key: str, required: bool) -> float:
    v = rec.get(key)
    if v is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return float("nan")
    if isinstance(v, bool):
        raise ValueError(f"field {key!r} value {v!r} is not a number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"field {key!r} value {v!r} is not a number") from None
    if not np.isfinite(x):
        raise ValueError(f"field {key!r} value {v!r} is not finite")
    return x


@dataclass
class _Stats:
    bad_lines: int = 0
    examples: list[str] = field(default_factory=list)

    def bad(self, path: Path, lineno: int, msg: str, skip: bool) -> None:
        where = f"{path}:{lineno}: {msg}"
        if not skip:
            raise DataError(where)
        self.bad_lines += 1
        if len(self.examples) < MAX_BAD_LINE_EXAMPLES:
            self.examples.append(where)


# ---------------------------------------------------------------------------------------------
# interactions in memory


@dataclass
class _Interactions:
    """Interned interactions in file order."""

    user_tokens: list[str] = field(default_factory=list)
    item_tokens: list[str] = field(default_factory=list)
    u: array = field(default_factory=lambda: array("q"))
    i: array = field(default_factory=lambda: array("q"))
    t: array = field(default_factory=lambda: array("d"))
    r: array = field(default_factory=lambda: array("d"))
    has_ts: bool = True
    _uid: dict[str, int] = field(default_factory=dict)
    _iid: dict[str, int] = field(default_factory=dict)

    def add(self, user: str, item: str, ts: float, rating: float) -> None:
        u = self._uid.get(user)
        if u is None:
            u = self._uid[user] = len(self.user_tokens)
            self.user_tokens.append(user)
        i = self._iid.get(item)
        if i is None:
            i = self._iid[item] = len(self.item_tokens)
            self.item_tokens.append(item)
        self.u.append(u)
        self.i.append(i)
        self.t.append(ts)
        self.r.append(rating)

    def __len__(self) -> int:
        return len(self.u)


def _dedup_mask(u: np.ndarray, i: np.ndarray, t: np.ndarray) -> np.ndarray:
    """True for rows to keep: the first of each exact (user, item, timestamp) group."""
    n = len(u)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    order = np.lexsort((np.arange(n), t, i, u))
    us, is_, ts = u[order], i[order], t[order]
    dup = (us[1:] == us[:-1]) & (is_[1:] == is_[:-1]) & (ts[1:] == ts[:-1])
    keep[order[1:][dup]] = False
    return keep


def kcore_mask(u: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    """Rows kept by k-core filtering: users and items with >= k interactions, to a fixed point."""
    keep = np.ones(len(u), dtype=bool)
    if k <= 1 or len(u) == 0:
        return keep
    while True:
        uc = np.bincount(u[keep], minlength=int(u.max()) + 1)
        ic = np.bincount(i[keep], minlength=int(i.max()) + 1)
        new = keep & (uc[u] >= k) & (ic[i] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _first_appearance(idx: np.ndarray) -> np.ndarray:
    """Distinct values of idx in order of first appearance."""
    vals, first = np.unique(idx, return_index=True)
    return vals[np.argsort(first, kind="stable")]


def _timestamp_ties(u: np.ndarray, t: np.ndarray) -> int:
    """Interactions whose timestamp equals the previous one of the same user (after sorting)."""
    if len(u) < 2:
        return 0
    order = np.lexsort((t, u))
    us, ts = u[order], t[order]
    return int(((us[1:] == us[:-1]) & (ts[1:] == ts[:-1])).sum())


# ---------------------------------------------------------------------------------------------
# format detection


def _first_record(path: Path) -> tuple[int, dict, str]:
    """(line number, record, 'json' or 'literal') of the first non-blank line."""
    for lineno, text, err in _iter_lines(path):
        if err is not None:
            raise DataError(f"{path}:{lineno}: {err}")
        try:
            json.loads(text)
            style = "json"
        except ValueError:
            style = "literal"
        try:
            return lineno, _parse_record(text), style
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: cannot detect the format: {e} (pass --format)") from None
    raise DataError(f"{path}: no records (empty file)")


def _is_csv_2023(path: Path) -> bool:
    with _open_binary(path) as f:
        raw = f.readline()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    head = raw.decode("utf-8", "replace").lstrip(BOM).strip().lower()
    cols = [c.strip() for c in head.split(",")]
    return "user_id" in cols and ("parent_asin" in cols or "asin" in cols) and "timestamp" in cols


def detect_format(source: str | Path) -> str:
    """Which importer applies to `source` (a file or folder): one of FORMATS except 'auto'."""
    p = Path(source)
    if p.is_dir():
        if any(p.glob("*.inter")):
            return "atomic"
        if any(p.glob("*.txt")):
            return "txt"
        raise DataError(f"{p}: folder holds no .inter (RecBole atomic) or .txt (BSARec) file; "
                        f"pass a reviews file or --format")
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    low = p.name.lower()
    if low.endswith(".inter"):
        return "atomic"
    if low.endswith(".txt"):
        return "txt"
    if low.endswith((".csv", ".csv.gz")):
        if _is_csv_2023(p):
            return "amazon2023"
        raise DataError(f"{p}: CSV without user_id, parent_asin and timestamp columns; cannot detect the format")
    lineno, rec, style = _first_record(p)
    keys = set(rec)
    if "user_id" in keys and ("parent_asin" in keys or "timestamp" in keys):
        return "amazon2023"
    if "reviewerID" in keys:
        return "amazon2018" if style == "json" else "amazon2014"
    if keys & {"asin", "parent_asin"}:
        raise DataError(f"{p}:{lineno}: this looks like a metadata file (no reviewerID/user_id); pass the "
                        f"reviews file as SOURCE and this one as --meta")
    raise DataError(f"{p}:{lineno}: cannot detect the format from fields {sorted(keys)[:8]} (pass --format)")


def find_meta_file(source: Path) -> Path | None:
    """The metadata file next to an Amazon reviews file, by the dumps' naming conventions:
    reviews_Beauty_5.json.gz / Beauty_5.json.gz / Beauty.jsonl.gz -> meta_Beauty.json[l][.gz]."""
    stem = source.name
    for ext in (".gz", ".jsonl", ".json", ".csv"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    for suffix in ("_5", ".5core", "_5core"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    if stem.startswith("reviews_"):
        stem = stem[len("reviews_"):]
    if not stem or stem.startswith("meta_"):
        return None
    for ext in (".json.gz", ".jsonl.gz", ".json", ".jsonl"):
        cand = source.parent / f"meta_{stem}{ext}"
        if cand.is_file() and cand.resolve() != source.resolve():
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# Amazon readers


_REVIEW_FIELDS = {  # fmt -> (user key, item key, time key, rating key, time divisor)
    "amazon2014": ("reviewerID", "asin", "unixReviewTime", "overall", 1.0),
    "amazon2018": ("reviewerID", "asin", "unixReviewTime", "overall", 1.0),
    "amazon2023": ("user_id", "parent_asin", "timestamp", "rating", 1000.0),
}


def _read_amazon_reviews(path: Path, fmt: str, skip: bool, stats: _Stats, progress: bool) -> tuple[_Interactions, int]:
    if path.name.lower().endswith((".csv", ".csv.gz")):
        return _read_csv_2023(path, skip, stats, progress)
    ukey, ikey, tkey, rkey, div = _REVIEW_FIELDS[fmt]
    inter = _Interactions()
    n_lines = 0
    for lineno, text, err in _iter_lines(path, progress):
        n_lines += 1
        if err is not None:
            stats.bad(path, lineno, err, skip)
            continue
        try:
            rec = _parse_record(text)
            user = _id_value(rec, ukey)
            item = _id_value(rec, ikey)
            ts = _number(rec, tkey, required=True) / div
            rating = _number(rec, rkey, required=False)
        except ValueError as e:
            stats.bad(path, lineno, str(e), skip)
            continue
        inter.add(user, item, ts, rating)
    return inter, n_lines


def _read_csv_2023(path: Path, skip: bool, stats: _Stats, progress: bool) -> tuple[_Interactions, int]:
    """Amazon 2023 rating-only CSV: user_id,parent_asin|asin,rating,timestamp (ms)."""
    inter = _Interactions()
    n_lines = 0
    header: list[str] | None = None
    for lineno, text, err in _iter_lines(path, progress):
        if err is not None:
            stats.bad(path, lineno, err, skip)
            continue
        row = next(csv.reader([text.rstrip("\r\n")]))
        if header is None:
            header = [c.strip() for c in row]
            continue
        n_lines += 1
        if len(row) != len(header):
            stats.bad(path, lineno, f"expected {len(header)} comma-separated fields, found {len(row)}", skip)
            continue
        rec = dict(zip(header, row))
        try:
            user = _id_value(rec, "user_id")
            item = _id_value(rec, "parent_asin" if "parent_asin" in rec else "asin")
            ts = _number(rec, "timestamp", required=True) / 1000.0
            rating = _number(rec, "rating", required=False) if rec.get("rating", "") != "" else float("nan")
        except ValueError as e:
            stats.bad(path, lineno, str(e), skip)
            continue
        inter.add(user, item, ts, rating)
    return inter, n_lines


def _as_str_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v if x is not None and str(x).strip()]
    return [str(v)]


def _category_paths(rec: dict) -> list[list[str]]:
    v = rec.get("categories", rec.get("category"))
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [[v]]
    if not isinstance(v, (list, tuple)):
        return [[str(v)]]
    if any(isinstance(x, (list, tuple)) for x in v):  # 2014: a list of paths
        return [[str(level) for level in p] if isinstance(p, (list, tuple)) else [str(p)] for p in v if p]
    path = [str(level) for level in v if level is not None]  # 2018 / 2023: one flat path
    return [path] if path else []


def _image_urls(rec: dict) -> list[str]:
    urls: list[str] = []
    if "imUrl" in rec:  # 2014
        urls += _as_str_list(rec.get("imUrl"))
    if "imageURLHighRes" in rec or "imageURL" in rec:  # 2018: high-res and thumbnail, pairwise
        hi, lo = _as_str_list(rec.get("imageURLHighRes")), _as_str_list(rec.get("imageURL"))
        for k in range(max(len(hi), len(lo))):
            urls += hi[k:k + 1] + lo[k:k + 1]
    images = rec.get("images")
    if isinstance(images, list):  # 2023: dicts with thumb / large / hi_res, MAIN variant first
        dicts = [im for im in images if isinstance(im, dict)]
        dicts.sort(key=lambda im: 0 if str(im.get("variant", "")).upper() == "MAIN" else 1)
        for im in dicts:
            for key in ("large", "hi_res", "thumb"):
                urls += _as_str_list(im.get(key))
        urls += [s for s in images if isinstance(s, str) and s.strip()]
    seen: set[str] = set()
    out = []
    for u in urls:
        u = u.strip()
        if u and u not in seen:
            seen.add(u)
            out.append(u)
    return out


def _meta_record(item: str, rec: dict) -> dict:
    title = rec.get("title")
    brand = rec.get("brand") if "brand" in rec else rec.get("store")
    if not brand and isinstance(rec.get("details"), dict):
        brand = rec["details"].get("Brand") or rec["details"].get("brand")
    desc = rec.get("description")
    if isinstance(desc, (list, tuple)):
        desc = "\n".join(str(d) for d in desc if d is not None)
    return {
        "item": item,
        "title": "" if title is None else str(title),
        "categories": _category_paths(rec),
        "brand": "" if brand is None else str(brand),
        "description": "" if desc is None else str(desc),
        "image_urls": _image_urls(rec),
    }


def _read_amazon_meta(path: Path, fmt: str, needed: set[str], skip: bool, stats: _Stats,
                      progress: bool) -> tuple[dict[str, dict], dict]:
    """Metadata records of the needed items (first record per item wins)."""
    key = "parent_asin" if fmt == "amazon2023" else "asin"
    # cheap pre-filter: lines whose id (found textually) is not needed are not parsed at all.
    # Safe: the real key always matches, so a needed line is never skipped; a spurious match only
    # costs a full parse. The pattern starts with a literal, which the regex engine scans fast.
    pattern = re.compile(r"""%s["']\s*:\s*["']([^"'\\]+)["']""" % key)
    found: dict[str, dict] = {}
    n_lines = dups = 0
    for lineno, text, err in _iter_lines(path, progress):
        n_lines += 1
        if err is not None:
            stats.bad(path, lineno, err, skip)
            continue
        hits = pattern.findall(text)
        if hits and not any(h in needed for h in hits):
            continue
        try:
            rec = _parse_record(text)
            item = _id_value(rec, key)
        except ValueError as e:
            hint = (" (is this a metadata file of the same generation as the reviews?)" if "missing field" in str(e)
                    else "")
            stats.bad(path, lineno, f"{e}{hint}", skip)
            continue
        if item not in needed:
            continue
        if item in found:
            dups += 1
            continue
        found[item] = _meta_record(item, rec)
    return found, {"meta_lines": n_lines, "meta_duplicates": dups}


# ---------------------------------------------------------------------------------------------
# writing


def _item_row(m: dict) -> str:
    paths = m["categories"]
    url = m["image_urls"][0] if m["image_urls"] else ""
    fields = [
        m["item"],
        clean_text(m["title"]),
        " ".join(category_tokens(paths[0])) if paths else "",
        clean_text(m["brand"]),
        clean_text(m["description"]),
        "%20".join(clean_text(url).split(" ")) if url else "",
    ]
    return "\t".join(fields)


def _meta_line(m: dict) -> str:
    s = json.dumps(m, ensure_ascii=False)
    return s.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _write_lines(path: Path, header: str | None, lines: Iterator[str] | list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if header is not None:
            f.write(header + "\n")
        buf: list[str] = []
        for line in lines:
            buf.append(line)
            if len(buf) >= 65536:
                f.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            f.write("\n".join(buf) + "\n")


@dataclass
class _Kept:
    """Interactions after de-duplication and k-core, as arrays in file order."""

    u: np.ndarray
    i: np.ndarray
    t: np.ndarray
    r: np.ndarray
    user_tokens: list[str]
    item_tokens: list[str]
    has_ts: bool
    has_ratings: bool
    items_in_order: list[str]  # item tokens in order of first interaction
    info: dict


def _finish_interactions(inter: _Interactions, kcore: int, dedup: bool, where: str) -> _Kept:
    if len(inter) == 0:
        raise DataError(f"{where}: no interactions")
    u = np.frombuffer(inter.u, dtype=np.int64).copy()
    i = np.frombuffer(inter.i, dtype=np.int64).copy()
    t = np.frombuffer(inter.t, dtype=np.float64).copy()
    r = np.frombuffer(inter.r, dtype=np.float64).copy()
    n0 = len(u)
    keep = _dedup_mask(u, i, t) if (dedup and inter.has_ts) else np.ones(n0, dtype=bool)
    n_dup = int(n0 - keep.sum())
    u, i, t, r = u[keep], i[keep], t[keep], r[keep]
    kmask = kcore_mask(u, i, kcore)
    n_k = int(len(u) - kmask.sum())
    u, i, t, r = u[kmask], i[kmask], t[kmask], r[kmask]
    if len(u) == 0:
        raise DataError(f"{where}: no interactions left after {kcore}-core filtering")
    has_ratings = bool(len(r)) and not bool(np.isnan(r).any())
    items_in_order = [inter.item_tokens[j] for j in _first_appearance(i)]
    n_users = len(np.unique(u))
    info = {
        "interactions_read": n0,
        "duplicates_dropped": n_dup,
        "removed_by_kcore": n_k,
        "users": n_users,
        "items": len(items_in_order),
        "interactions": int(len(u)),
        "has_timestamps": inter.has_ts,
        "timestamp_ties": _timestamp_ties(u, t) if inter.has_ts else 0,
        "has_ratings": has_ratings,
        "ratings_missing": int(np.isnan(r).sum()),
    }
    return _Kept(u, i, t, r, inter.user_tokens, inter.item_tokens, inter.has_ts, has_ratings, items_in_order, info)


def _write_inter(path: Path, k: _Kept) -> None:
    header = ["user_id:token", "item_id:token"]
    if k.has_ratings:
        header.append("rating:float")
    if k.has_ts:
        header.append("timestamp:float")
    ut, it = k.user_tokens, k.item_tokens

    def rows() -> Iterator[str]:
        rs = [format_number(x) for x in k.r.tolist()] if k.has_ratings else None
        ts = [format_number(x) for x in k.t.tolist()] if k.has_ts else None
        for n, (uu, ii) in enumerate(zip(k.u.tolist(), k.i.tolist())):
            parts = [ut[uu], it[ii]]
            if rs is not None:
                parts.append(rs[n])
            if ts is not None:
                parts.append(ts[n])
            yield "\t".join(parts)

    _write_lines(path, "\t".join(header), rows())


def _write_item_files(folder: Path, name: str, items_in_order: list[str], meta: dict[str, dict]) -> dict:
    recs = [meta[tok] for tok in items_in_order if tok in meta]
    _write_lines(folder / f"{name}.item", "\t".join(ITEM_HEADER), (_item_row(m) for m in recs))
    _write_lines(folder / f"{name}.meta.jsonl", None, (_meta_line(m) for m in recs))
    no_meta = len(items_in_order) - len(recs)
    no_url = no_meta + sum(1 for m in recs if not m["image_urls"])
    return {"items_with_metadata": len(recs), "items_without_metadata": no_meta,
            "items_without_image_url": no_url}


# ---------------------------------------------------------------------------------------------
# atomic folders and .txt files


def _atomic_paths(source: Path) -> tuple[Path, str]:
    """(folder, stem) of a RecBole atomic dataset given its folder or its .inter file."""
    if source.is_file():
        return source.parent, source.name[: -len(".inter")] if source.name.endswith(".inter") else source.stem
    inters = sorted(source.glob("*.inter"))
    named = source / f"{source.name}.inter"
    if named.is_file():
        return source, source.name
    if len(inters) == 1:
        return source, inters[0].name[: -len(".inter")]
    if not inters:
        raise DataError(f"{source}: no .inter file in the folder")
    raise DataError(f"{source}: several .inter files ({', '.join(p.name for p in inters)}); pass one of them")


def _read_atomic_inter(path: Path) -> _Interactions:
    table = read_atomic(path)
    ucol = table.find("user_id", "user", "uid", "reviewerID")
    icol = table.find("item_id", "item", "iid", "asin", "parent_asin")
    tcol = table.find("timestamp", "time", "unixReviewTime")
    rcol = table.find("rating", "overall", "score")
    if ucol is None or icol is None:
        raise DataError(f"{path}: header needs user_id and item_id columns (found {', '.join(table.names)})")
    for col, typ in ((ucol, "token"), (icol, "token"), (tcol, "float"), (rcol, "float")):
        if col is not None and table.types[col] != typ:
            raise DataError(f"{path}: column {col} must be typed {typ}, not {table.types[col]}")
    if len(table) == 0:
        raise DataError(f"{path}: no interactions")
    inter = _Interactions(has_ts=tcol is not None)
    users, items = table.columns[ucol], table.columns[icol]
    times = table.columns[tcol] if tcol else np.zeros(len(users))
    ratings = table.columns[rcol] if rcol else np.full(len(users), np.nan)
    for row, (uu, ii) in enumerate(zip(users, items), start=1):
        if not uu.strip() or not ii.strip():
            raise DataError(f"{path}: data row {row} has an empty user or item id")
    for n in range(len(users)):
        inter.add(users[n], items[n], float(times[n]), float(ratings[n]))
    return inter


def _copy_side_table(src: Path, dst: Path, id_names: tuple[str, ...], new_id: str, keep: set[str]) -> dict | None:
    """Copy a .item/.user atomic file: id column renamed, rows of kept ids only (first row wins)."""
    if not src.is_file():
        return None
    read_atomic(src).find_token(*id_names)  # validates the whole file (encoding, header, field counts, numbers)
    with open_text(src) as f:
        header = f.readline().rstrip("\r\n").split("\t")
        names = [h.rsplit(":", 1)[0] for h in header]
        col = next((names.index(n) for n in id_names if n in names), None)
        if col is None:
            raise DataError(f"{src}: header has no {' / '.join(id_names)} column")
        header[col] = f"{new_id}:token"
        rows, seen, dups = [], set(), 0
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if parts[col] not in keep:
                continue
            if parts[col] in seen:
                dups += 1
                continue
            seen.add(parts[col])
            rows.append(line)
    _write_lines(dst, "\t".join(header), rows)
    return {"rows": len(rows), "duplicates": dups, "missing": len(keep - seen)}


def _import_atomic(source: Path, tmp: Path, name: str, kcore: int) -> dict:
    folder, stem = _atomic_paths(source)
    inter_path = folder / f"{stem}.inter"
    kept = _finish_interactions(_read_atomic_inter(inter_path), kcore, dedup=True, where=str(inter_path))
    _write_inter(tmp / f"{name}.inter", kept)
    info = dict(kept.info)
    items = set(kept.items_in_order)
    users = {kept.user_tokens[j] for j in np.unique(kept.u)}
    it = _copy_side_table(folder / f"{stem}.item", tmp / f"{name}.item",
                          ("item_id", "item", "iid", "asin", "parent_asin"), "item_id", items)
    us = _copy_side_table(folder / f"{stem}.user", tmp / f"{name}.user",
                          ("user_id", "user", "uid", "reviewerID"), "user_id", users)
    if it is not None:
        info["items_without_metadata"] = it["missing"]
    meta_src = folder / f"{stem}.meta.jsonl"
    if meta_src.is_file():
        lines = []
        for lineno, text, err in _iter_lines(meta_src):
            try:
                if err:
                    raise ValueError(err)
                rec = json.loads(text)
                if rec.get("item") in items:
                    lines.append(text.rstrip("\r\n"))
            except (ValueError, AttributeError) as e:
                raise DataError(f"{meta_src}:{lineno}: {e}") from None
        _write_lines(tmp / f"{name}.meta.jsonl", None, lines)
    img_src = folder / "images"
    if img_src.is_dir():
        _link_tree(img_src, tmp / "images")
        info["images_copied"] = True
    info["copied"] = [p for p, x in ((f"{stem}.item", it), (f"{stem}.user", us)) if x is not None]
    return info


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the file system allows it."""
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def _import_txt(source: Path, tmp: Path, name: str, kcore: int) -> dict:
    path = source
    if source.is_dir():
        cands = [source / f"{source.name}.txt"] + sorted(source.glob("*.txt"))
        path = next((c for c in cands if c.is_file()), source / f"{source.name}.txt")
    users, seqs = read_sequence_txt(path)
    inter = _Interactions(has_ts=False)
    for user, seq in zip(users, seqs):
        for item in seq:
            inter.add(user, item, 0.0, float("nan"))
    kept = _finish_interactions(inter, kcore, dedup=False, where=str(path))
    _write_inter(tmp / f"{name}.inter", kept)
    return dict(kept.info)


# ---------------------------------------------------------------------------------------------
# entry point


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0") \
            or _ID_FORBIDDEN.search(name):
        raise DataError(f"invalid dataset name {name!r} (a plain folder name, not starting with '.')")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def import_dataset(
    source: str | Path,
    out_dir: str | Path,
    name: str,
    fmt: str = "auto",
    meta: str | Path | None = None,
    kcore: int = 0,
    *,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    find_meta: bool = True,
    progress: bool = False,
) -> dict:
    """Import `source` into the dataset folder `out_dir/name/` and return a summary dict.

    fmt: 'auto' (detect from the file name and first record), 'amazon2014', 'amazon2018',
    'amazon2023', 'atomic' (a RecBole folder or .inter file) or 'txt' (BSARec sequences).
    meta: the Amazon metadata file; when None and `find_meta`, a `meta_<Category>.json[l][.gz]`
    next to the reviews file is used if present.
    kcore: keep users and items with >= kcore interactions (to a fixed point); 0/1 = off.
    skip_bad_lines: skip and count malformed lines instead of raising DataError (Amazon files).
    overwrite: replace an existing `out_dir/name/` (its `images/` folder, if the new one has none,
    is carried over so downloaded images are not lost); otherwise an existing folder is an error.
    """
    t0 = time.perf_counter()
    _check_name(name)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if kcore < 0:
        raise DataError(f"kcore must be >= 0, got {kcore}")
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: not found")
    out_dir = Path(out_dir)
    dest = out_dir / name
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise DataError(f"{dest}: dataset folder already exists (pass --overwrite to replace it)")
    if fmt == "auto":
        fmt = detect_format(source)
    if fmt in AMAZON_FORMATS and source.is_dir():
        raise DataError(f"{source}: a folder; pass the reviews file itself for --format {fmt}")
    meta_path = Path(meta) if meta is not None else None
    if meta_path is not None and not meta_path.is_file():
        raise DataError(f"{meta_path}: metadata file not found")
    if meta_path is None and find_meta and fmt in AMAZON_FORMATS:
        meta_path = find_meta_file(source)
    if meta_path is not None and fmt not in AMAZON_FORMATS:
        raise DataError(f"--meta applies to Amazon review dumps only, not to format {fmt!r}")

    created = _missing_folders(out_dir)  # removed again if the import fails: no new empty folders
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir, f".{name}.import-")
    try:
        summary: dict[str, Any] = {"dataset": name, "format": fmt, "source": str(source),
                                   "meta": str(meta_path) if meta_path else None, "kcore": kcore}
        stats = _Stats()
        if fmt in AMAZON_FORMATS:
            inter, n_lines = _read_amazon_reviews(source, fmt, skip_bad_lines, stats, progress)
            kept = _finish_interactions(inter, kcore, dedup=True, where=str(source))
            summary["lines_read"] = n_lines
            summary.update(kept.info)
            _write_inter(tmp / f"{name}.inter", kept)
            if meta_path is not None:
                needed = set(kept.items_in_order)
                found, minfo = _read_amazon_meta(meta_path, fmt, needed, skip_bad_lines, stats, progress)
                summary.update(minfo)
                summary.update(_write_item_files(tmp, name, kept.items_in_order, found))
            else:
                summary.update({"items_with_metadata": 0, "items_without_metadata": kept.info["items"],
                                "items_without_image_url": kept.info["items"]})
        elif fmt == "atomic":
            summary.update(_import_atomic(source, tmp, name, kcore))
        else:
            summary.update(_import_txt(source, tmp, name, kcore))
        summary["bad_lines"] = stats.bad_lines
        if stats.examples:
            summary["bad_line_examples"] = stats.examples
        summary["out_dir"] = str(dest)
        summary["files"] = sorted(p.name for p in tmp.iterdir()) + [f"{name}.import.json"]
        summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
        (tmp / f"{name}.import.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
        _move_into_place(tmp, dest)
    except BaseException:
        _remove_tree(tmp)
        _remove_empty(created)
        raise
    return summary


def _missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            break
        out.append(p)
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty; leave any that are not."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished temporary folder to `dest`, replacing an existing one last."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    old.rmdir()
    if dest.is_dir() and not dest.is_symlink() and (dest / "images").is_dir() and not (tmp / "images").exists():
        os.replace(dest / "images", tmp / "images")  # keep downloaded images
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        _remove_tree(old)
    else:
        old.unlink()


__all__ = ["FORMATS", "ITEM_HEADER", "category_tokens", "clean_text", "detect_format", "find_meta_file",
           "format_number", "import_dataset", "kcore_mask"]
