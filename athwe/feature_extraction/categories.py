"""Category multi-hot vectors: one column per category level name, as upstream's cat.pt.

By default the item's first category path (the `.item` categories column, which the importer
fills with the first path); with `all_paths` every path from `<name>.meta.jsonl`. Level names are
the importer's tokens (spaces as `_`), so the vocabulary is the same either way. The vocabulary
is ordered by first appearance in internal-id order, which makes it deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from athwe.dataset.importers import category_tokens
from athwe.feature_extraction.items import CATEGORY_COLUMNS, ItemTable


@dataclass
class Categories:
    """Multi-hot rows (n_items + 1, len(vocab)), row 0 zeros, and the items without categories."""

    matrix: torch.Tensor
    vocab: list[str]
    missing: list[dict]
    source: str
    paths: str  # "first" or "all"


def find_category_column(table: ItemTable) -> str | None:
    for c in CATEGORY_COLUMNS:
        if c in table.types:
            return c
    return None


def build_categories(table: ItemTable, item_tokens: list[str], all_paths: bool = False,
                     meta_paths: dict[str, list[list[str]]] | None = None) -> Categories | None:
    """Multi-hot categories per internal id; None when the dataset has no category data."""
    per_item: list[list[str]] = [[]]
    missing: list[dict] = []
    if all_paths and meta_paths is not None:
        source = "meta.jsonl (all paths)"
        for i, tok in enumerate(item_tokens[1:], start=1):
            levels: list[str] = []
            for path in meta_paths.get(tok, []):
                levels.extend(category_tokens(path))
            per_item.append(levels)
    else:
        col = find_category_column(table)
        if table.path is None or col is None:
            return None
        source = f"{table.path.name}:{col}"
        for tok in item_tokens[1:]:
            row = table.seq_rows.get(tok, {})
            vals = row.get(col)
            if vals is None:
                raw = table.rows.get(tok, {}).get(col, "")
                vals = [raw] if raw else []
            per_item.append([v for v in vals if v])
    vocab: dict[str, int] = {}
    for levels in per_item:
        for lv in levels:
            vocab.setdefault(lv, len(vocab))
    mat = torch.zeros(len(item_tokens), len(vocab), dtype=torch.float32)
    for i, levels in enumerate(per_item):
        if i == 0:
            continue
        if not levels:
            missing.append({"id": i, "item": item_tokens[i], "reason": "no_categories"})
            continue
        mat[i, [vocab[lv] for lv in levels]] = 1.0
    return Categories(matrix=mat, vocab=list(vocab), missing=missing, source=source,
                      paths="all" if all_paths and meta_paths is not None else "first")
