"""Reading `<name>.meta.jsonl`, the importer's lossless item metadata (one JSON object per line:
item, title, brand, description, categories, image_urls; athwe.dataset.importers)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from athwe.dataset.atomic import not_utf8_error, open_text
from athwe.errors import DataError


def read_meta(path: Path, field: str, check: Callable[[Any], bool], expected: str) -> Iterator[tuple[str, Any]]:
    """Yield (item token, record[field]) for each record, `field` defaulting to [] when absent or
    null. A line that is not a JSON object with a string `item`, or whose field fails `check`, is a
    DataError naming the file, the line and `expected`. The file is UTF-8, with or without a
    byte-order mark; bytes that are not UTF-8 are a DataError naming the line."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    item = rec["item"]
                    value = rec.get(field) or []
                    if not isinstance(item, str):
                        raise ValueError("item must be a string")
                    if not check(value):
                        raise ValueError(expected)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise DataError(f"{path}:{lineno}: bad metadata record ({e})") from None
                yield item, value
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e) from None
