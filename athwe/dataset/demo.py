"""A small synthetic dataset bundled with the package, generated offline and deterministically.

`ensure_demo(data_dir)` returns `data_dir/"demo"`, generating it on first use. The folder holds
RecBole atomic files (`demo.inter`, `demo.item`) and one 64x64 PNG per item under `images/`.

The interaction log carries temporal structure that an ID-only order model cannot see:

* the gap to the previous interaction is short (minutes to hours), medium (1-5 days) or long
  (2-8 weeks), drawn independently per interaction;
* a user's pace carries over: what follows an interaction depends on the gap that led *to* it.
  After an interaction that came a short gap after the one before (a browsing session), the next
  item usually (70%) shares its leaf category and often (15%) comes from a sibling leaf under the
  same mid-level category; after one that ended a long break, the next item often (45%) comes
  from the leaf's fixed "companion" leaf in another top-level category (headphones -> running
  shoes, say), or (35%) follows a calendar signal (each top-level category has a "season", a
  peak in the year), and the leaf is rarely continued; medium gaps sit in between.

So the gap before the last item of a history tells which kind of transition comes next, and
with it which items belong at the top of the ranking (the last item's own leaf or its companion
leaf), while the items alone do not (gap kinds are independent, so earlier transitions say
nothing about the current one): the signal is in the timestamps a model reads, not in the unseen
gap before the item it predicts.

Item images encode the category path (background colour = top level, shape = mid level,
pattern and shade = leaf) with small per-item variation.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from athwe.errors import DataError
from athwe.utils import temp_dir

if TYPE_CHECKING:
    from PIL import Image as PILImage

DEMO_NAME = "demo"
DEMO_VERSION = 5  # bump whenever the generator's output changes

MARKER = ".demo-complete"
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token_seq\tdescription:token_seq\tcategories:token_seq\tbrand:token\timage:token"
IMAGE_SIZE = 64

T0 = 1640995200  # 2022-01-01T00:00:00Z
SPAN_S = 730 * 86400  # the log covers about two years
YEAR_S = 365.2425 * 86400
MIN_LEN, MAX_LEN = 5, 80
MIN_ITEM_COUNT = 3
DEFAULT_USERS, DEFAULT_ITEMS = 2000, 1000

# gap kinds: probability and range in seconds (short is log-uniform, others uniform)
GAP_KINDS = ("short", "medium", "long")
GAP_PROBS = np.array([0.5, 0.3, 0.2])
GAP_RANGES = {"short": (120.0, 4 * 3600.0), "medium": (86400.0, 5 * 86400.0), "long": (14 * 86400.0, 56 * 86400.0)}
# per kind of the gap that led to the previous interaction: P(same leaf), P(sibling leaf in the
# same mid category), P(companion leaf), P(seasonal top category) for the next one
TRANSITIONS = {"short": (0.70, 0.15, 0.0, 0.0), "medium": (0.30, 0.0, 0.0, 0.30), "long": (0.05, 0.0, 0.45, 0.35)}
SEASON_SHARPNESS = 2.5

# top -> (season peak as a fraction of the year, {mid: {leaf: (singular noun, variants)}})
SIZES = ["S", "M", "L", "XL"]
TAXONOMY: dict[str, tuple[float, dict[str, dict[str, tuple[str, list[str]]]]]] = {
    "Electronics": (0.1, {
        "Audio": {"Headphones": ("Headphones", ["Wired", "Wireless", "ANC"]),
                  "Speakers": ("Speaker", ["Mini", "Portable", "Max"]),
                  "Earbuds": ("Earbuds", ["Lite", "Pro", "Sport"])},
        "Computing": {"Keyboards": ("Keyboard", ["TKL", "Full", "Compact"]),
                      "Mice": ("Mouse", ["Wireless", "Gaming", "Vertical"])},
        "Photography": {"Tripods": ("Tripod", ["Travel", "Studio", "Mini"]),
                        "Camera_Bags": ("Camera Bag", ["Sling", "Backpack", "Pouch"]),
                        "Lenses": ("Lens", ["35mm", "50mm", "85mm"])},
        "Phone_Accessories": {"Chargers": ("Charger", ["20W", "45W", "65W"]),
                              "Phone_Cases": ("Phone Case", ["Slim", "Rugged", "Wallet"])},
    }),
    "Home": (0.3, {
        "Bedding": {"Duvets": ("Duvet", ["Twin", "Queen", "King"]),
                    "Pillows": ("Pillow", ["Standard", "King", "Body"]),
                    "Sheet_Sets": ("Sheet Set", ["Twin", "Queen", "King"])},
        "Lighting": {"Desk_Lamps": ("Desk Lamp", ["LED", "Clip", "Arm"]),
                     "Floor_Lamps": ("Floor Lamp", ["Arc", "Tripod", "Torchiere"])},
        "Storage": {"Baskets": ("Basket", ["Small", "Medium", "Large"]),
                    "Shelves": ("Shelf", ["2-Tier", "3-Tier", "5-Tier"]),
                    "Drawer_Organizers": ("Drawer Organizer", ["4-Slot", "6-Slot", "8-Slot"])},
        "Bath": {"Towels": ("Towel Set", ["2-Piece", "4-Piece", "6-Piece"]),
                 "Bath_Mats": ("Bath Mat", ["Small", "Medium", "Runner"])},
    }),
    "Outdoors": (0.5, {
        "Camping": {"Tents": ("Tent", ["1P", "2P", "4P"]),
                    "Sleeping_Bags": ("Sleeping Bag", ["20F", "30F", "40F"]),
                    "Camp_Stoves": ("Camp Stove", ["Mini", "Duo", "Pro"])},
        "Hiking": {"Backpacks": ("Daypack", ["18L", "28L", "40L"]),
                   "Trekking_Poles": ("Trekking Poles", ["Pair", "Carbon", "Alloy"])},
        "Cycling": {"Helmets": ("Bike Helmet", ["S", "M", "L"]),
                    "Bike_Lights": ("Bike Light", ["400lm", "800lm", "Set"]),
                    "Bike_Locks": ("Bike Lock", ["U-Lock", "Chain", "Cable"])},
        "Gardening": {"Pruners": ("Pruner", ["Bypass", "Anvil", "Mini"]),
                      "Watering_Cans": ("Watering Can", ["5L", "8L", "10L"])},
    }),
    "Apparel": (0.7, {
        "Outerwear": {"Rain_Jackets": ("Rain Jacket", SIZES), "Parkas": ("Parka", SIZES),
                      "Vests": ("Vest", SIZES)},
        "Footwear": {"Running_Shoes": ("Running Shoe", ["8", "9", "10", "11"]),
                     "Boots": ("Boot", ["8", "9", "10", "11"])},
        "Activewear": {"Leggings": ("Leggings", SIZES), "Sports_Bras": ("Sports Bra", SIZES),
                       "Tank_Tops": ("Tank Top", SIZES)},
        "Accessories": {"Scarves": ("Scarf", ["Long", "Infinity", "Square"]),
                        "Gloves": ("Gloves", ["Touch", "Lined", "Liner"])},
    }),
    "Kitchen": (0.9, {
        "Cookware": {"Skillets": ("Skillet", ["8in", "10in", "12in"]),
                     "Saucepans": ("Saucepan", ["1qt", "2qt", "3qt"]),
                     "Dutch_Ovens": ("Dutch Oven", ["4qt", "6qt", "7qt"])},
        "Cutlery": {"Chef_Knives": ("Chef Knife", ["6in", "8in", "10in"]),
                    "Paring_Knives": ("Paring Knife", ["3in", "3.5in", "4in"])},
        "Bakeware": {"Cake_Pans": ("Cake Pan", ["8in", "9in", "Set"]),
                     "Baking_Sheets": ("Baking Sheet", ["Half", "Quarter", "2-Pack"]),
                     "Muffin_Tins": ("Muffin Tin", ["6-Cup", "12-Cup", "24-Cup"])},
        "Small_Appliances": {"Blenders": ("Blender", ["600W", "900W", "1200W"]),
                             "Toasters": ("Toaster", ["2-Slice", "4-Slice"]),
                             "Kettles": ("Electric Kettle", ["1L", "1.5L", "1.7L"])},
    }),
}

# words used in titles (first word) and descriptions, per top category
STYLES = {
    "Electronics": ["Nova", "Pulse", "Echo", "Quantum", "Arc", "Vector", "Lumen", "Orbit"],
    "Home": ["Oak", "Linen", "Cozy", "Nordic", "Rattan", "Bamboo", "Velvet", "Marble"],
    "Outdoors": ["Alpine", "Trail", "Ridge", "Summit", "Canyon", "Pine", "Ultralight", "Basecamp"],
    "Apparel": ["Merino", "Linen", "Fleece", "Cotton", "Wool", "Ripstop", "Cashmere", "Denim"],
    "Kitchen": ["Walnut", "Copper", "Cast Iron", "Stainless", "Enamel", "Ceramic", "Olivewood", "Matte Black"],
}
FEATURES = {
    "Electronics": ["USB-C charging", "low latency", "long battery life", "a compact design", "multi-device pairing"],
    "Home": ["easy assembly", "machine washable fabric", "a warm white glow", "a space saving shape",
             "hypoallergenic fill"],
    "Outdoors": ["water resistance", "a small packed size", "reflective trim", "three-season ratings",
                 "a lightweight frame"],
    "Apparel": ["machine washable fabric", "breathable panels", "a relaxed fit", "recycled fabric",
                "quick drying fibres"],
    "Kitchen": ["dishwasher safe parts", "oven safe materials", "induction ready bases", "an ergonomic handle",
                "easy cleaning"],
}
COLOURS = ["black", "white", "slate", "sage", "navy", "terracotta", "sand", "olive", "charcoal", "rust"]
BRANDS = [
    "Ashgrove", "Brightwell", "Copperfield", "Driftwood", "Elmstead", "Foxglove", "Greystone", "Hollowell",
    "Ironbark", "Juniper", "Kestrel", "Larkspur", "Meridian", "Northwind", "Oakhaven", "Pinecrest",
    "Quillon", "Redfern", "Silverbirch", "Thornbury", "Umbra", "Valewood", "Westbrook", "Yarrow",
    "Zephyr", "Alderton", "Bramble", "Cobalt", "Dunmore", "Everly", "Fairhaven", "Glenholm",
    "Harrowgate", "Islay", "Kinloch", "Lindqvist", "Moorcroft", "Nettlebed", "Orrin", "Penrose",
]
# image look: background colour per top, shape per mid position, pattern/shade per leaf position
TOP_COLOURS = [(70, 110, 200), (205, 190, 150), (80, 165, 95), (165, 95, 175), (225, 140, 70)]
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("hstripes", "vstripes", "dots")
SHADES = ((30, 30, 30), (245, 245, 245), (250, 215, 60))


@dataclass(frozen=True)
class Leaf:
    """One leaf category with its place in the hierarchy."""

    top: str
    mid: str
    name: str
    top_idx: int
    mid_idx: int  # position of the mid category within its top
    leaf_idx: int  # position of the leaf within its mid
    mid_key: int  # global index of the mid category
    noun: str
    variants: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"{self.top} {self.mid} {self.name}"


def _leaves() -> list[Leaf]:
    out: list[Leaf] = []
    mid_key = 0
    for ti, (top, (_, mids)) in enumerate(TAXONOMY.items()):
        for mi, (mid, leaves) in enumerate(mids.items()):
            for li, (name, (noun, variants)) in enumerate(leaves.items()):
                out.append(Leaf(top, mid, name, ti, mi, li, mid_key, noun, tuple(variants)))
            mid_key += 1
    return out


LEAVES = _leaves()
SEASON_PEAKS = np.array([peak for peak, _ in TAXONOMY.values()])


def _rng(seed: int, part: int) -> np.random.Generator:
    """Independent stream per generation stage, so editing one stage does not shift the others."""
    return np.random.default_rng(np.random.SeedSequence([seed, part]))


def _draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index drawn with probability proportional to non-negative `weights` (sum > 0)."""
    c = np.cumsum(weights)
    return min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(weights) - 1)


def _readable(token: str) -> str:
    return token.replace("_", " ").lower()


# ---------------------------------------------------------------------------------------------
# catalogue


@dataclass
class _Catalogue:
    item_leaf: np.ndarray  # leaf index per item
    leaf_items: list[np.ndarray]  # items of each leaf, most popular first
    leaf_pop: list[np.ndarray]  # popularity weight of those items
    leaf_prior: np.ndarray  # global leaf popularity (sums to 1)
    titles: list[str]
    descriptions: list[str]
    brands: list[str]


def _make_catalogue(rng: np.random.Generator, n_items: int) -> _Catalogue:
    n_leaves = len(LEAVES)
    # uneven leaf sizes, at least 3 items per leaf
    size_w = rng.lognormal(0.0, 0.7, n_leaves)
    sizes = 3 + rng.multinomial(n_items - 3 * n_leaves, size_w / size_w.sum())
    leaf_of = np.repeat(np.arange(n_leaves), sizes)
    item_leaf = leaf_of[rng.permutation(n_items)]  # item ids do not reveal the category
    prior = sizes * rng.lognormal(0.0, 0.3, n_leaves)
    leaf_prior = prior / prior.sum()
    leaf_items, leaf_pop = [], []
    for leaf in range(n_leaves):
        members = rng.permutation(np.flatnonzero(item_leaf == leaf))
        leaf_items.append(members)
        leaf_pop.append((np.arange(1, len(members) + 1) ** -0.8) + 0.03)  # Zipf-like with a floor

    titles, descriptions, brands = [], [], []
    used: set[str] = set()
    for it in range(n_items):
        lf = LEAVES[item_leaf[it]]
        style = STYLES[lf.top][rng.integers(len(STYLES[lf.top]))]
        variant = lf.variants[rng.integers(len(lf.variants))]
        title = f"{style} {lf.noun} {variant}"
        if title in used:  # keep titles distinct with a series mark
            k = 2
            while f"{title} Mk{k}" in used:
                k += 1
            title = f"{title} Mk{k}"
        used.add(title)
        if rng.random() < 0.85:
            brand = BRANDS[8 * lf.top_idx + int(rng.integers(8))]
        else:
            brand = BRANDS[int(rng.integers(len(BRANDS)))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        f1, f2 = rng.choice(len(FEATURES[lf.top]), size=2, replace=False)
        desc = (f"{title} by {brand} in {colour}, part of our {lf.top.lower()} "
                f"{_readable(lf.mid)} range ({_readable(lf.name)}).")
        if rng.random() < 0.7:
            desc += f" It features {FEATURES[lf.top][f1]} and {FEATURES[lf.top][f2]}."
        titles.append(title)
        descriptions.append(desc)
        brands.append(brand)
    return _Catalogue(item_leaf, leaf_items, leaf_pop, leaf_prior, titles, descriptions, brands)


# ---------------------------------------------------------------------------------------------
# interactions


def _season_weights(ts: float) -> np.ndarray:
    """Preference over top categories at time `ts`: a peak around each top's season."""
    phase = ((ts - T0) / YEAR_S) % 1.0
    return np.exp(SEASON_SHARPNESS * np.cos(2 * np.pi * (phase - SEASON_PEAKS)))


def _user_times(rng: np.random.Generator, length: int) -> tuple[np.ndarray, list[str]]:
    """Timestamps (int seconds) and the gap kind before each interaction after the first."""
    kinds = [GAP_KINDS[_draw(rng, GAP_PROBS)] for _ in range(length - 1)]
    gaps = []
    for kind in kinds:
        lo, hi = GAP_RANGES[kind]
        g = np.exp(rng.uniform(np.log(lo), np.log(hi))) if kind == "short" else rng.uniform(lo, hi)
        gaps.append(int(g))
    offsets = np.concatenate([[0], np.cumsum(gaps, dtype=np.int64)])
    keep = int(np.searchsorted(offsets, SPAN_S, side="right"))  # stay inside the two-year window
    keep = max(keep, MIN_LEN)
    offsets, kinds = offsets[:keep], kinds[: keep - 1]
    start = T0 + int(rng.integers(0, max(1, SPAN_S - int(offsets[-1]))))
    return start + offsets, kinds


def companion_leaves() -> np.ndarray:
    """(n_leaves,) leaf index: each leaf's companion, a leaf of the next top-level category (fixed by
    the taxonomy, no randomness): where users go after a long break."""
    tops = np.array([lf.top_idx for lf in LEAVES])
    n_tops = int(tops.max()) + 1
    out = np.empty(len(LEAVES), dtype=np.int64)
    for i, t in enumerate(tops):
        targets = np.flatnonzero(tops == (t + 1) % n_tops)
        out[i] = targets[i % len(targets)]
    return out


def _make_interactions(rng: np.random.Generator, cat: _Catalogue, n_users: int) -> list[list[tuple[int, int]]]:
    """Per user, a chronological list of (timestamp, item)."""
    n_leaves = len(LEAVES)
    leaf_top = np.array([lf.top_idx for lf in LEAVES])
    leaf_mid = np.array([lf.mid_key for lf in LEAVES])
    top_masks = [leaf_top == t for t in range(len(TAXONOMY))]
    sibling_masks = [(leaf_mid == leaf_mid[i]) & (np.arange(n_leaves) != i) for i in range(n_leaves)]
    companions = companion_leaves()
    users: list[list[tuple[int, int]]] = []
    for _ in range(n_users):
        length = int(min(MAX_LEN, MIN_LEN + np.floor(rng.lognormal(np.log(13.0), 0.85))))
        times, kinds = _user_times(rng, length)
        n_pref = int(rng.integers(2, 5))
        pref_leaves = rng.choice(n_leaves, size=n_pref, replace=False, p=cat.leaf_prior)
        pref = np.zeros(n_leaves)
        pref[pref_leaves] = rng.dirichlet(np.ones(n_pref))
        base = 0.8 * pref + 0.2 * cat.leaf_prior
        seen: set[int] = set()
        exhausted = np.zeros(n_leaves, dtype=bool)
        events: list[tuple[int, int]] = []
        prev = -1
        for j, ts in enumerate(times):
            ts = int(ts)
            weights = base
            # the transition into item j follows the gap that led to item j-1 (its "pace")
            mode = kinds[j - 2] if j > 1 else None
            if mode is not None:
                p_same, p_sib, p_comp, p_season = TRANSITIONS[mode]
                u = rng.random()
                if u < p_same:
                    weights = np.eye(1, n_leaves, prev)[0]
                elif u < p_same + p_sib and sibling_masks[prev].any():
                    weights = base * sibling_masks[prev] + 1e-3 * sibling_masks[prev]
                elif u < p_same + p_sib + p_comp:
                    weights = np.eye(1, n_leaves, companions[prev])[0]
                elif u < p_same + p_sib + p_comp + p_season:
                    top = _draw(rng, _season_weights(ts))
                    mask = top_masks[top]
                    own = pref * mask
                    glob = cat.leaf_prior * mask
                    weights = 0.5 * glob / glob.sum() + (0.5 * own / own.sum() if own.sum() > 0
                                                         else 0.5 * glob / glob.sum())
                elif mode == "long":
                    weights = base.copy()
                    weights[prev] = 0.0  # after a long break the old leaf is rarely continued
            item = -1
            for _attempt in range(30):
                w = np.where(exhausted, 0.0, weights)
                if w.sum() <= 0:
                    w = np.where(exhausted, 0.0, base)
                if w.sum() <= 0:
                    break
                leaf = _draw(rng, w)
                members = cat.leaf_items[leaf]
                pop = cat.leaf_pop[leaf]
                if seen:
                    pop = np.where(np.isin(members, list(seen)), 0.0, pop)
                if pop.sum() <= 0:
                    exhausted[leaf] = True
                    continue
                item = int(members[_draw(rng, pop)])
                break
            if item < 0:
                raise DataError("demo generator: a user ran out of items (n_items too small)")
            seen.add(item)
            events.append((ts, item))
            prev = int(cat.item_leaf[item])
        users.append(events)
    return users


def _fill_rare_items(rng: np.random.Generator, cat: _Catalogue, users: list[list[tuple[int, int]]]) -> None:
    """Give every item at least MIN_ITEM_COUNT interactions by swapping in items of the same leaf.

    Only the item changes, never its leaf or timestamp, so the planted structure is untouched.
    """
    n_items = len(cat.item_leaf)
    counts = np.zeros(n_items, dtype=np.int64)
    for ev in users:
        for _, it in ev:
            counts[it] += 1
    rare = np.flatnonzero(counts < MIN_ITEM_COUNT)
    if len(rare) == 0:
        return
    owned = [{it for _, it in ev} for ev in users]
    slots: dict[int, list[tuple[int, int]]] = {}  # leaf -> (user, position)
    for u, ev in enumerate(users):
        for p, (_, it) in enumerate(ev):
            slots.setdefault(int(cat.item_leaf[it]), []).append((u, p))
    for it in rare:
        leaf = int(cat.item_leaf[it])
        cands = slots.get(leaf, [])
        for k in rng.permutation(len(cands)):
            if counts[it] >= MIN_ITEM_COUNT:
                break
            u, p = cands[k]
            ts, old = users[u][p]
            if it in owned[u] or counts[old] <= MIN_ITEM_COUNT:
                continue
            users[u][p] = (ts, int(it))
            owned[u].discard(old)
            owned[u].add(int(it))
            counts[old] -= 1
            counts[it] += 1


# ---------------------------------------------------------------------------------------------
# images


def _render_image(rng: np.random.Generator, leaf: Leaf) -> PILImage.Image:
    """A 64x64 RGB picture whose colour/shape/pattern follow the category path."""
    from PIL import Image, ImageDraw

    s = IMAGE_SIZE
    jitter = rng.integers(-12, 13, size=3)
    bg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(TOP_COLOURS[leaf.top_idx], jitter))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    line = tuple(int(c * 0.75) for c in bg)
    pattern = PATTERNS[leaf.leaf_idx % len(PATTERNS)]
    step = 8 + 2 * (leaf.mid_idx % 2)
    off = int(rng.integers(0, step))
    if pattern == "hstripes":
        for y in range(off, s, step):
            draw.rectangle([0, y, s - 1, y + 1], fill=line)
    elif pattern == "vstripes":
        for x in range(off, s, step):
            draw.rectangle([x, 0, x + 1, s - 1], fill=line)
    else:
        for y in range(off, s, step):
            for x in range(off, s, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=line)
    cx, cy = (s // 2 + int(v) for v in rng.integers(-5, 6, size=2))
    r = int(rng.integers(14, 20))
    fill = tuple(int(np.clip(c + v, 0, 255))
                 for c, v in zip(SHADES[leaf.leaf_idx % len(SHADES)], rng.integers(-15, 16, size=3)))
    shape = SHAPES[leaf.mid_idx % len(SHAPES)]
    outline = (20, 20, 20) if sum(fill) > 300 else (235, 235, 235)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill, outline=outline)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline)
    return img


# ---------------------------------------------------------------------------------------------
# writing


def _token(prefix: str, i: int, n: int) -> str:
    return f"{prefix}{i + 1:0{max(4, len(str(n)))}d}"


def _write_dataset(folder: Path, seed: int, n_users: int, n_items: int) -> dict:
    cat = _make_catalogue(_rng(seed, 1), n_items)
    users = _make_interactions(_rng(seed, 2), cat, n_users)
    _fill_rare_items(_rng(seed, 3), cat, users)
    item_tok = [_token("i", i, n_items) for i in range(n_items)]

    lines = [INTER_HEADER]
    for u, events in enumerate(users):
        ut = str(u + 1)  # users are the plain numbers 1..n a newcomer types (`athwe retrieve --user 42`)
        for ts, it in events:
            lines.append(f"{ut}\t{item_tok[it]}\t{ts}")
    (folder / f"{DEMO_NAME}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")

    lines = [ITEM_HEADER]
    for it in range(n_items):
        lf = LEAVES[cat.item_leaf[it]]
        fields = [item_tok[it], cat.titles[it], cat.descriptions[it], lf.path, cat.brands[it],
                  f"images/{item_tok[it]}.png"]
        assert not any(("\t" in f or "\n" in f) for f in fields)
        lines.append("\t".join(fields))
    (folder / f"{DEMO_NAME}.item").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")

    img_dir = folder / "images"
    img_dir.mkdir()
    img_rng = _rng(seed, 4)
    for it in range(n_items):
        _render_image(img_rng, LEAVES[cat.item_leaf[it]]).save(img_dir / f"{item_tok[it]}.png", format="PNG")

    counts = np.bincount([it for ev in users for _, it in ev], minlength=n_items)
    return {
        "version": DEMO_VERSION,
        "seed": seed,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": int(counts.sum()),
        "n_leaf_categories": len(LEAVES),
        "min_user_length": min(len(ev) for ev in users),
        "min_item_count": int(counts.min()),
    }


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def generate_demo(
    out_dir: str | Path, seed: int = 0, n_users: int = DEFAULT_USERS, n_items: int = DEFAULT_ITEMS
) -> Path:
    """Generate the demo dataset into `out_dir` (the dataset folder itself) and return it.

    Everything is written to a temporary sibling folder first and renamed into place at the end;
    an existing `out_dir` is replaced only after the new copy is complete.
    """
    out_dir = Path(out_dir)
    if n_users < 1:
        raise DataError(f"demo generator: n_users must be >= 1, got {n_users}")
    if n_items < 3 * len(LEAVES) + MAX_LEN:
        raise DataError(f"demo generator: n_items must be >= {3 * len(LEAVES) + MAX_LEN}, got {n_items}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        info = _write_dataset(tmp, seed, n_users, n_items)
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8", newline="\n")
        old: Path | None = None
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if _marker_matches(out_dir, seed, n_users, n_items):
                _remove_tree(tmp)  # another process finished the same dataset first
            elif old is not None and not out_dir.exists():
                os.replace(old, out_dir)  # put the previous folder back
                old = None
                raise
            else:
                raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                _remove_tree(old)
            else:
                old.unlink()
    except BaseException:
        _remove_tree(tmp)
        raise
    return out_dir


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a generated demo folder, or None when missing or unreadable."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_matches(folder: Path, seed: int, n_users: int, n_items: int) -> bool:
    m = read_marker(folder)
    if m is None:
        return False
    want = {"version": DEMO_VERSION, "seed": seed, "n_users": n_users, "n_items": n_items}
    return all(m.get(k) == v for k, v in want.items()) and all(
        (folder / f"{DEMO_NAME}.{ext}").is_file() for ext in ("inter", "item"))


def _clean_stale_temps(parent: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporary folders left by interrupted runs (older than `max_age_s`)."""
    now = time.time()
    for pattern in (f".{DEMO_NAME}.tmp-*", f".{DEMO_NAME}.old-*"):
        for p in parent.glob(pattern):
            try:
                if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                    _remove_tree(p)
            except OSError:
                pass


def demo_is_current(data_dir: str | Path, *, seed: int = 0) -> bool:
    """True when `data_dir/"demo"` holds the demo this generator version makes (ensure_demo would keep it)."""
    return _marker_matches(Path(data_dir) / DEMO_NAME, seed, DEFAULT_USERS, DEFAULT_ITEMS)


def ensure_demo(data_dir: str | Path, *, seed: int = 0) -> Path:
    """Return `data_dir/"demo"`, generating it if missing or if its marker is for another version/seed."""
    data_dir = Path(data_dir)
    folder = data_dir / DEMO_NAME
    if demo_is_current(data_dir, seed=seed):
        return folder
    if data_dir.is_dir():
        _clean_stale_temps(data_dir)
    return generate_demo(folder, seed=seed)
