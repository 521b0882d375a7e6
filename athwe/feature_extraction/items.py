"""Item metadata for feature extraction: the `.item` table (and `.meta.jsonl` category paths)
keyed by item token, and the upstream-style text built from it.

Text per item: the chosen `.item` fields, each cleaned as upstream (HTML entities decoded, double
quotes removed, whitespace runs including line breaks collapsed to one space (upstream deleted line
breaks, gluing words together), `_` in category tokens read as spaces, a final
period), a field of 2000 characters or more blanked (upstream did the same), empty fields
skipped, the rest joined with spaces. With a template (`"{movie_title}, {release_year}"`) the
cleaned fields are substituted without the added period.
"""
from __future__ import annotations

import html
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from athwe.dataset.atomic import read_atomic
from athwe.dataset.meta import read_meta
from athwe.errors import DataError, FeatureError, brief

MAX_FIELD_CHARS = 2000
ITEM_ID_COLUMNS = ("item_id", "item", "iid", "asin", "parent_asin")
# default text fields (upstream: title, first category path, brand) and the column names that stand in for them
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "title": ("title", "movie_title", "name", "item_name"),
    "categories": ("categories", "category", "class", "genre", "genres"),
    "brand": ("brand", "store", "manufacturer"),
}
DEFAULT_TEXT_FIELDS = ("title", "categories", "brand")
CATEGORY_COLUMNS = FIELD_ALIASES["categories"]
_QUOTES = re.compile(r'"')


@dataclass
class ItemTable:
    """The `.item` rows by item token; values are strings (token_seq columns joined by spaces)."""

    path: Path | None
    columns: list[str] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    seq_rows: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # token_seq columns as lists

    def resolve(self, name: str) -> str | None:
        """The column that stands for `name`: itself, else its first present alias."""
        if name in self.types:
            return name
        for alias in FIELD_ALIASES.get(name, ()):
            if alias in self.types:
                return alias
        return None


def read_item_table(dataset_dir: Path, name: str) -> ItemTable:
    """Read `<dataset_dir>/<name>.item`; an absent file gives an empty table (path None)."""
    path = dataset_dir / f"{name}.item"
    if not path.is_file():
        return ItemTable(path=None)
    table = read_atomic(path)
    icol = table.find_token(*ITEM_ID_COLUMNS)
    if icol is None:
        raise DataError(f"{path}: no item id column (one of {', '.join(ITEM_ID_COLUMNS)}) in the header")
    out = ItemTable(path=path, columns=[c for c in table.names if c != icol],
                    types={c: t for c, t in table.types.items() if c != icol})
    ids = table.columns[icol]
    for j, tok in enumerate(ids):
        if tok in out.rows:
            continue  # first row per item wins, as in the importer
        row: dict[str, str] = {}
        seq: dict[str, list[str]] = {}
        for c in out.columns:
            v = table.columns[c][j]
            if out.types[c] in ("token_seq", "float_seq"):
                vals = [str(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]
                seq[c] = vals
                row[c] = " ".join(vals)
            else:
                row[c] = str(v.item() if hasattr(v, "item") else v)
        out.rows[tok] = row
        out.seq_rows[tok] = seq
    return out


def read_meta_category_paths(dataset_dir: Path, name: str) -> dict[str, list[list[str]]] | None:
    """All category paths per item from `<name>.meta.jsonl` (written by the importer), or None."""
    path = dataset_dir / f"{name}.meta.jsonl"
    if not path.is_file():
        return None
    out: dict[str, list[list[str]]] = {}
    for item, paths in read_meta(path, "categories", lambda v: isinstance(v, list),
                                 "categories must be a list of paths"):
        out.setdefault(item, [[str(level) for level in p] for p in paths if isinstance(p, list)])
    return out


def clean_field(value: str, column: str, period: bool = True) -> tuple[str, bool]:
    """Upstream-style cleaning of one field; returns (text, blanked_for_length)."""
    text = html.unescape(value)
    if column in CATEGORY_COLUMNS:
        text = text.replace("_", " ")
    text = _QUOTES.sub("", text)
    text = " ".join(text.split())
    if not text:
        return "", False
    if period:
        text = text.rstrip(".") + "."
    if len(text) >= MAX_FIELD_CHARS:
        return "", True
    return text, False


def _has_content(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


@dataclass
class ItemTexts:
    """Text per internal id (index 0 unused) plus which items have none and why."""

    texts: list[str]
    missing: list[dict]
    blanked_fields: int
    fields: list[str]
    template: str | None


def template_fields(template: str) -> list[str]:
    """The column names a text template uses, in order; FeatureError naming the template and the
    problem when it is not a usable format string (checked before any model is loaded)."""
    def bad(problem: str) -> FeatureError:
        return FeatureError(f"text template {template!r} is not valid: {problem} (expected a format string over "
                            f".item columns, e.g. '{{title}}, {{brand}}'; literal braces are written {{{{ and }}}})")

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise bad(brief(e)) from None
    names: list[str] = []
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if not name or name.isdigit():
            raise bad(f"positional field {{{name}}}; fields are .item column names")
        if "." in name or "[" in name:
            raise bad(f"field {{{name}}} uses attribute or index access; fields are plain .item column names")
        if spec and "{" in spec:
            raise bad(f"field {{{name}}} has a nested field in its format spec {spec!r}")
        names.append(name)
    if not names:
        raise bad("it uses no field")
    try:
        template.format_map({n: "" for n in names})  # a bad conversion or format spec fails on any text
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise bad(brief(e)) from None
    return names


def text_columns(table: ItemTable, fields: list[str] | None = None, template: str | None = None) -> list[str]:
    """The `.item` columns item text is built from; FeatureError for a bad template or unknown fields."""
    if table.path is None:
        raise FeatureError("no .item file: item text cannot be built")
    if template is not None:
        names = template_fields(template)
        unknown = [n for n in names if n not in table.types]
        if unknown:
            raise FeatureError(f"{table.path}: text template {template!r} uses unknown field(s) "
                               f"{', '.join(unknown)} (--text-template); columns: {', '.join(table.columns)}")
        columns = list(dict.fromkeys(names))
    elif fields:
        unknown = [f for f in fields if table.resolve(f) is None]
        if unknown:
            raise FeatureError(f"{table.path}: unknown text field(s) {', '.join(unknown)} (--text-fields); "
                               f"columns: {', '.join(table.columns)}")
        columns = [table.resolve(f) for f in fields]  # type: ignore[misc]
    else:
        columns = [c for c in (table.resolve(f) for f in DEFAULT_TEXT_FIELDS) if c is not None]
        if not columns:
            raise FeatureError(f"{table.path}: none of the default text fields (title, categories, brand or their "
                               f"aliases) is a column; columns: {', '.join(table.columns)} "
                               f"(pass text fields or a template)")
    return columns


def build_item_texts(table: ItemTable, item_tokens: list[str], fields: list[str] | None = None,
                     template: str | None = None) -> ItemTexts:
    """Compose each item's text from its `.item` row (see the module docstring)."""
    columns = text_columns(table, fields, template)
    texts = [""]
    missing: list[dict] = []
    blanked = 0
    for i, tok in enumerate(item_tokens[1:], start=1):
        row = table.rows.get(tok)
        if row is None:
            texts.append("")
            missing.append({"id": i, "item": tok, "reason": "no_metadata_row"})
            continue
        cleaned: dict[str, str] = {}
        for c in columns:
            cleaned[c], was_blanked = clean_field(row.get(c, ""), c, period=template is None)
            blanked += was_blanked
        if template is not None:
            text = " ".join(template.format_map(cleaned).split())
        else:
            text = " ".join(cleaned[c] for c in columns if cleaned[c])
        if not _has_content(text):
            texts.append("")
            missing.append({"id": i, "item": tok, "reason": "empty_text"})
            continue
        texts.append(text)
    return ItemTexts(texts=texts, missing=missing, blanked_fields=blanked, fields=columns, template=template)
