"""Writers of small raw-data fixtures in the real on-disk formats the importer reads.

One canonical log (REVIEWS) and catalogue (ITEMS) rendered as:
* Amazon 2014: Python-literal dicts, one per line (`repr`, so single quotes, double quotes where a
  string holds an apostrophe), `reviews_<Cat>_5.json[.gz]` and `meta_<Cat>.json[.gz]`;
* Amazon 2018: strict JSON lines, `<Cat>_5.json[.gz]` / `meta_<Cat>.json[.gz]`;
* Amazon 2023: JSON lines with `parent_asin` and millisecond timestamps, `<Cat>.jsonl[.gz]` /
  `meta_<Cat>.jsonl[.gz]`, and the rating-only CSV;
* a RecBole atomic folder and a BSARec `.txt` file.

The log holds an exact duplicate review, a repeat with another timestamp (kept), a timestamp tie,
users whose lines are out of time order, an item without metadata (B009NOMETA), a metadata-only
item (B999UNUSED), a duplicated metadata record, unicode titles, tabs / newlines / U+2028 in
titles and descriptions. Each writer returns the file paths and what an import must produce.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

CATEGORY = "Kitchen_Test"
IMG = "http://images.example.com/images/I"

# (user, item, rating, unix seconds, extra milliseconds for the 2023 rendering), in file order
REVIEWS: list[tuple[str, str, float, int, int]] = [
    ("A1USER", "B002", 5.0, 1300000300, 0),
    ("A1USER", "B001", 4.0, 1300000100, 250),
    ("A2USER", "B001", 3.0, 1300000200, 0),
    ("A1USER", "B003", 5.0, 1300000300, 0),  # same time as A1USER's first line: a tie, file order kept
    ("A2USER", "B004", 2.0, 1300000500, 999),
    ("A2USER", "B001", 3.0, 1300000200, 0),  # exact duplicate of line 3: dropped
    ("A2USER", "B001", 4.0, 1300000900, 0),  # same user and item, later: kept
    ("A3USER", "B009NOMETA", 1.0, 1300000050, 0),
    ("A3USER", "B002", 5.0, 1300000060, 5),
    ("A3USER", "B005", 4.0, 1300000070, 0),
    ("A4USER", "B002", 3.0, 1300000010, 0),
    ("A4USER", "B004", 4.0, 1300000020, 0),
    ("A4USER", "B006", 5.0, 1300000030, 0),
    ("A5ONE", "B006", 5.0, 1300000040, 0),
    ("A1USER", "B005", 3.0, 1300000400, 123),
]
DUPLICATE_LINES = {5}  # 0-based index into REVIEWS
NO_META = {"B009NOMETA"}

# canonical catalogue: paths = all category paths (2014 keeps all, 2018/2023 hold the first)
ITEMS: dict[str, dict] = {
    "B001": {"title": "Café Crème Mug — 350 ml",
             "paths": [["Home & Kitchen", "Kitchen & Dining", "Coffee  Mugs"], ["Gifts", "For Him"]],
             "brand": "Acme Home",
             "desc": ["A sturdy mug.\tDishwasher safe.", "Microwave safe."],
             "images": 2},
    "B002": {"title": "日本語 Tea Set\twith a tab", "paths": [["Home & Kitchen", "Tea"]], "brand": "",
             "desc": [], "images": 1},
    "B003": {"title": "Bob's \"Best\" Kettle", "paths": [["Home & Kitchen", "Kettles"]], "brand": "Bob's",
             "desc": ["Boils water."], "images": 0},
    "B004": {"title": "Knife  Block\n", "paths": [], "brand": "Ünïcode Brand",
             "desc": ["Line one\r\nLine two\u2028Line three"], "images": 1},
    "B005": {"title": "Plain", "paths": [["Home & Kitchen"]], "brand": "Plain Co", "desc": ["x"], "images": 1},
    "B006": {"title": "Pan", "paths": [["Home & Kitchen", "Cookware", "Pans"]], "brand": "Pan Co",
             "desc": ["A pan."], "images": 1},
    "B999UNUSED": {"title": "Never reviewed", "paths": [["Other"]], "brand": "Nobody", "desc": ["-"], "images": 1},
}


def write_lines(path: Path, lines: list[str], gz: bool) -> Path:
    """Write text lines (utf-8, '\\n'-terminated), gzip-compressed when gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _ext(base: str, gz: bool) -> str:
    return base + (".gz" if gz else "")


def expected_interactions(ms: bool = False) -> list[tuple[str, str, float, float]]:
    """(user, item, rating, seconds) in file order after dropping the exact duplicate."""
    out = []
    for n, (u, i, r, t, extra) in enumerate(REVIEWS):
        if n in DUPLICATE_LINES:
            continue
        out.append((u, i, r, (t * 1000 + extra) / 1000 if ms else float(t)))
    return out


def _expected(gen: str, reviews: Path, meta: Path, ms: bool = False) -> dict:
    items = {}
    for item, m in ITEMS.items():
        if item == "B999UNUSED":
            continue
        items[item] = {
            "item": item,
            "title": m["title"],
            "categories": [list(p) for p in (m["paths"] if gen == "2014" else m["paths"][:1])],
            "brand": m["brand"],
            "description": _desc_2014(m) if gen == "2014" else "\n".join(m["desc"]),
            "image_urls": _urls(gen, item, m["images"]),
        }
    return {"reviews": reviews, "meta": meta, "interactions": expected_interactions(ms), "meta_records": items,
            "no_meta": set(NO_META)}


def _desc_2014(m: dict) -> str:
    return " ".join(m["desc"])


def _urls(gen: str, item: str, n: int) -> list[str]:
    if gen == "2014":
        return [f"{IMG}/{item}.jpg"] if n else []
    if gen == "2018":
        out = []
        for k in range(n):
            out += [f"{IMG}/{item}-{k}.jpg", f"{IMG}/{item}-{k}._SS40_.jpg"]
        return out
    # 2023: the MAIN image (written last in the file) first; per image large, hi_res, thumb
    out = []
    for k in ([n - 1] + list(range(n - 1)) if n else []):
        out += [f"{IMG}/{item}-{k}._AC_.jpg"]
        if k == n - 1:
            out += [f"{IMG}/{item}-{k}._AC_SL1500_.jpg"]  # only the MAIN image has hi_res
        out += [f"{IMG}/{item}-{k}._AC_US40_.jpg"]
    return out


# ------------------------------------------------------------------------------------ 2014


def write_amazon2014(folder: Path, gz: bool = True) -> dict:
    """reviews_<Cat>_5.json[.gz] and meta_<Cat>.json[.gz] as Python-literal lines."""
    lines = []
    for u, i, r, t, _ in REVIEWS:
        rec = {"reviewerID": u, "asin": i, "reviewerName": "Mary O'Brien", "helpful": [0, 0],
               "reviewText": "It's \"fine\"", "overall": r, "summary": "ok", "unixReviewTime": t,
               "reviewTime": "03 13, 2011"}
        lines.append(repr(rec))
    reviews = write_lines(folder / _ext(f"reviews_{CATEGORY}_5.json", gz), lines, gz)
    meta_lines = []
    for item, m in ITEMS.items():
        rec = {"asin": item, "title": m["title"], "price": 12.99,
               "related": {"also_bought": ["B001", "B002"]}, "salesRank": {"Kitchen": 1234},
               "categories": m["paths"], "description": _desc_2014(m)}
        if m["images"]:
            rec["imUrl"] = f"{IMG}/{item}.jpg"
        if m["brand"]:
            rec["brand"] = m["brand"]
        meta_lines.append(repr(rec))
        if item == "B001":  # a second record for the same asin: the first one wins
            meta_lines.append(repr({"asin": "B001", "title": "DUPLICATE", "categories": [["X"]]}))
    meta = write_lines(folder / _ext(f"meta_{CATEGORY}.json", gz), meta_lines, gz)
    return _expected("2014", reviews, meta)


# ------------------------------------------------------------------------------------ 2018


def write_amazon2018(folder: Path, gz: bool = True) -> dict:
    """<Cat>_5.json[.gz] and meta_<Cat>.json[.gz] as strict JSON lines."""
    lines = []
    for u, i, r, t, _ in REVIEWS:
        rec = {"overall": r, "verified": True, "reviewTime": "03 13, 2011", "reviewerID": u, "asin": i,
               "style": {"Color:": " Red"}, "reviewerName": "Zoë", "reviewText": "Nice\nmug", "summary": "ok",
               "unixReviewTime": t}
        lines.append(json.dumps(rec))
    reviews = write_lines(folder / _ext(f"{CATEGORY}_5.json", gz), lines, gz)
    meta_lines = []
    for item, m in ITEMS.items():
        n = m["images"]
        rec = {"category": m["paths"][0] if m["paths"] else [], "tech1": "", "description": m["desc"], "fit": "",
               "title": m["title"], "also_buy": ["B001"], "tech2": "", "brand": m["brand"], "feature": ["f"],
               "rank": "1 in Kitchen", "also_view": [], "main_cat": "Amazon Home", "similar_item": "",
               "date": "", "price": "$9.99", "asin": item,
               "imageURL": [f"{IMG}/{item}-{k}._SS40_.jpg" for k in range(n)],
               "imageURLHighRes": [f"{IMG}/{item}-{k}.jpg" for k in range(n)]}
        meta_lines.append(json.dumps(rec, ensure_ascii=False))
        if item == "B001":
            meta_lines.append(json.dumps({"asin": "B001", "title": "DUPLICATE", "category": ["X"]}))
    meta = write_lines(folder / _ext(f"meta_{CATEGORY}.json", gz), meta_lines, gz)
    return _expected("2018", reviews, meta)


# ------------------------------------------------------------------------------------ 2023


def _variant_asin(item: str, n: int) -> str:
    return f"{item}V{n % 2}"  # reviews name a variant; parent_asin names the item


def write_amazon2023(folder: Path, gz: bool = True) -> dict:
    """<Cat>.jsonl[.gz] (timestamps in ms) and meta_<Cat>.jsonl[.gz]."""
    lines = []
    for n, (u, i, r, t, extra) in enumerate(REVIEWS):
        rec = {"rating": r, "title": "ok", "text": "Nice<br />mug", "images": [], "asin": _variant_asin(i, n),
               "parent_asin": i, "user_id": u, "timestamp": t * 1000 + extra, "helpful_vote": 0,
               "verified_purchase": True}
        lines.append(json.dumps(rec))
    reviews = write_lines(folder / _ext(f"{CATEGORY}.jsonl", gz), lines, gz)
    meta_lines = []
    for item, m in ITEMS.items():
        n = m["images"]
        images = []
        for k in range(n):
            main = k == n - 1
            images.append({"thumb": f"{IMG}/{item}-{k}._AC_US40_.jpg", "large": f"{IMG}/{item}-{k}._AC_.jpg",
                           "variant": "MAIN" if main else f"PT0{k + 1}",
                           "hi_res": f"{IMG}/{item}-{k}._AC_SL1500_.jpg" if main else None})
        store = m["brand"]
        details = {"Material": "Steel"}
        if item == "B006":  # brand only in details
            store, details = None, {"Brand": m["brand"]}
        rec = {"main_category": "Amazon Home", "title": m["title"], "average_rating": 4.5, "rating_number": 10,
               "features": ["f"], "description": m["desc"], "price": None, "images": images, "videos": [],
               "store": store, "categories": m["paths"][0] if m["paths"] else [], "details": details,
               "parent_asin": item, "bought_together": None}
        meta_lines.append(json.dumps(rec, ensure_ascii=False))
        if item == "B001":
            meta_lines.append(json.dumps({"parent_asin": "B001", "title": "DUPLICATE", "categories": ["X"]}))
    meta = write_lines(folder / _ext(f"meta_{CATEGORY}.jsonl", gz), meta_lines, gz)
    return _expected("2023", reviews, meta, ms=True)


def write_amazon2023_csv(folder: Path, gz: bool = False) -> dict:
    """The 2023 rating-only CSV (user_id,parent_asin,rating,timestamp in ms)."""
    lines = ["user_id,parent_asin,rating,timestamp"]
    for u, i, r, t, extra in REVIEWS:
        lines.append(f"{u},{i},{r},{t * 1000 + extra}")
    reviews = write_lines(folder / _ext(f"{CATEGORY}.csv", gz), lines, gz)
    return {"reviews": reviews, "interactions": expected_interactions(ms=True)}


# ------------------------------------------------------------------------------------ atomic, txt


def write_atomic_folder(folder: Path, name: str = "src") -> dict:
    """A RecBole folder <folder>/<name>/ with .inter (columns in an unusual order), .item, .user."""
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    inter = ["timestamp:float\tuser_id:token\titem_id:token\trating:float\tlabel:float"]
    for u, i, r, t, _ in REVIEWS:
        inter.append(f"{t}.0\t{u}\t{i}\t{r}\t1")
    (d / f"{name}.inter").write_text("\n".join(inter) + "\n", encoding="utf-8")
    item = ["item_id:token\tmovie_title:token_seq\tyear:float\tclass:token_seq"]
    for k, it in enumerate(ITEMS):
        if it in NO_META:
            continue
        item.append(f"{it}\tTitle {k}\t199{k}\tA B")
    item.append("B001\tDuplicate row\t1999\tZ")
    (d / f"{name}.item").write_text("\n".join(item) + "\n", encoding="utf-8")
    users = ["user_id:token\tage:float"] + [f"{u}\t3{k}" for k, u in enumerate(["A1USER", "A2USER", "A3USER",
                                                                              "A4USER", "A5ONE", "ZNOBODY"])]
    (d / f"{name}.user").write_text("\n".join(users) + "\n", encoding="utf-8")
    return {"folder": d, "interactions": expected_interactions()}


TXT_LINES = ["1 1 2 3 4", "2 5 2 6", "3 7 8 7 9", "4 10"]


def write_txt(folder: Path, name: str = "seq") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.txt"
    p.write_text("\n".join(TXT_LINES) + "\n", encoding="utf-8")
    return p
