"""Readers for RecBole atomic files and BSARec/WEARec `.txt` sequence files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from athwe.errors import DataError

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


@dataclass
class AtomicTable:
    """One atomic file: typed columns in file order. token columns are lists of str,
    float columns float64 arrays, *_seq columns lists of lists."""

    path: Path
    names: list[str]
    types: dict[str, str]
    columns: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns[self.names[0]]) if self.names else 0

    def find(self, *candidates: str) -> str | None:
        """First column whose name is one of the candidates."""
        for c in candidates:
            if c in self.types:
                return c
        return None

    def find_token(self, *candidates: str) -> str | None:
        """Like find, for a user or item id column, which must be typed token."""
        c = self.find(*candidates)
        if c is not None and self.types[c] != "token":
            raise DataError(f"{self.path}: id column {c} must be typed token, not {self.types[c]}")
        return c


def _parse_header(path: Path, line: str) -> tuple[list[str], dict[str, str]]:
    names: list[str] = []
    types: dict[str, str] = {}
    for raw in line.rstrip("\r\n").split("\t"):
        if ":" not in raw:
            raise DataError(f"{path}: malformed header field {raw!r} (expected name:type)")
        name, typ = raw.rsplit(":", 1)
        if typ not in FIELD_TYPES:
            raise DataError(f"{path}: header field {raw!r} has unknown type {typ!r} (one of {', '.join(FIELD_TYPES)})")
        if not name or name in types:
            raise DataError(f"{path}: header field {raw!r} is empty or repeated")
        names.append(name)
        types[name] = typ
    return names, types


def read_atomic(path: str | Path) -> AtomicTable:
    """Read a RecBole atomic file (`.inter`, `.item`, `.user`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
            if not header.strip():
                raise DataError(f"{path}: empty file (expected a typed header such as user_id:token)")
            names, types = _parse_header(path, header)
            n = len(names)
            raw: list[list[str]] = [[] for _ in range(n)]
            linenos: list[int] = []
            for lineno, line in enumerate(f, start=2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                linenos.append(lineno)
                parts = line.split("\t")
                if len(parts) != n:
                    raise DataError(f"{path}:{lineno}: expected {n} tab-separated fields, found {len(parts)}")
                for i, p in enumerate(parts):
                    raw[i].append(p)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    table = AtomicTable(path=path, names=names, types=types)
    for name, col in zip(names, raw):
        typ = types[name]
        if typ == "token":
            table.columns[name] = col
        elif typ == "token_seq":
            table.columns[name] = [v.split() for v in col]
        elif typ == "float":
            table.columns[name] = _to_float(path, name, col, linenos)
        else:
            table.columns[name] = [_to_float(path, name, v.split(), [ln] * len(v.split()))
                                   for v, ln in zip(col, linenos)]
    return table


def _to_float(path: Path, name: str, values: list[str], linenos: list[int]) -> np.ndarray:
    """Floats of one column; `linenos[i]` is the file line of values[i], for error messages."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise DataError(f"{path}:{linenos[i]}: column {name} value {v!r} is not a number") from None
        raise
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DataError(f"{path}:{linenos[i]}: column {name} value {values[i]!r} is not finite")
    return arr


def read_sequence_txt(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read a BSARec/WEARec `.txt` file: `uid item item ...` per line, chronological."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    users: list[str] = []
    seqs: list[list[str]] = []
    seen: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise DataError(f"{path}:{lineno}: user {parts[0]!r} has no items")
                if parts[0] in seen:
                    raise DataError(f"{path}:{lineno}: user {parts[0]!r} appears on more than one line")
                seen.add(parts[0])
                users.append(parts[0])
                seqs.append(parts[1:])
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not users:
        raise DataError(f"{path}: no sequences found")
    return users, seqs
