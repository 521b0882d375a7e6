"""Readers for RecBole atomic files and BSARec/WEARec `.txt` sequence files.

Text files are read as UTF-8, with or without a byte-order mark (spreadsheet tools write one); a
BOM anywhere but at the very start, or bytes that are not UTF-8, are one-line DataErrors naming the
file and the line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from athwe.errors import DataError

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
TEXT_ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is dropped
BOM = "\ufeff"


def open_text(path: Path) -> IO[str]:
    """Open a data file for reading text: UTF-8, a leading byte-order mark dropped, universal newlines."""
    return open(path, encoding=TEXT_ENCODING)


def not_utf8_error(path: Path, err: UnicodeDecodeError | None = None) -> DataError:
    """The DataError for a file that is not UTF-8 text, naming the first line that does not decode
    (found by a second, binary pass, so reading valid files costs nothing extra)."""
    reason = err.reason if err is not None else "invalid UTF-8"
    try:
        with open(path, "rb") as f:
            if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
                return DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
            f.seek(0)
            for lineno, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the "
                                     f"line); save the file as UTF-8")
    except OSError:
        pass
    return DataError(f"{path}: not UTF-8 text ({reason}); save the file as UTF-8")


def stray_bom_error(path: Path, lineno: int) -> DataError:
    return DataError(f"{path}:{lineno}: byte-order mark (U+FEFF) inside the file, not at its start "
                     f"(were two files concatenated?)")


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
        with open_text(path) as f:
            header = f.readline()
            if not header.strip():
                raise DataError(f"{path}: empty file (expected a typed header such as user_id:token)")
            if BOM in header:
                raise stray_bom_error(path, 1)
            if "\x00" in header:
                raise DataError(f"{path}:1: NUL characters in the header (UTF-16 text?); save the file as UTF-8")
            names, types = _parse_header(path, header)
            n = len(names)
            raw: list[list[str]] = [[] for _ in range(n)]
            linenos: list[int] = []
            for lineno, line in enumerate(f, start=2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                if line[0] == BOM:
                    raise stray_bom_error(path, lineno)
                linenos.append(lineno)
                parts = line.split("\t")
                if len(parts) != n:
                    raise DataError(f"{path}:{lineno}: expected {n} tab-separated fields, found {len(parts)}")
                for i, p in enumerate(parts):
                    raw[i].append(p)
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e) from None
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
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if parts[0][0] == BOM:
                    raise stray_bom_error(path, lineno)
                if len(parts) < 2:
                    raise DataError(f"{path}:{lineno}: user {parts[0]!r} has no items")
                if parts[0] in seen:
                    raise DataError(f"{path}:{lineno}: user {parts[0]!r} appears on more than one line")
                seen.add(parts[0])
                users.append(parts[0])
                seqs.append(parts[1:])
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e) from None
    if not users:
        raise DataError(f"{path}: no sequences found")
    return users, seqs
