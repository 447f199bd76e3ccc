"""The event-log file format that training, evaluation and the service's replay / backfill all read.

Tab-separated text, plain or gzip (detected by magic bytes, not by the name), a header line naming the
columns ``user_id``, ``item_id`` and ``timestamp`` (any order; extra columns are allowed and ignored), then
one event a line. Ids are kept as strings; timestamps are numeric seconds (int or float), read as float64.
It lives outside ``hytrec.training`` so that the service can read logs without importing the trainer.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
GZIP_MAGIC = b"\x1f\x8b"
_HEADER = "\t".join(REQUIRED_COLUMNS)


class DataFormatError(ValueError):
    """An interaction file that cannot be read: missing, empty, bad header, or a malformed line."""


# --------------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"{path}: corrupt gzip data ({exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return text


def _fields_per_line(body: str) -> np.ndarray:
    """Number of tab-separated fields on each line of ``body`` (no trailing newline), vectorised."""
    buf = np.frombuffer(body.encode("utf-8"), dtype=np.uint8)
    tabs = np.flatnonzero(buf == 0x09)
    line_ends = np.append(np.flatnonzero(buf == 0x0A), len(buf))
    return np.diff(np.searchsorted(tabs, line_ends), prepend=0) + 1


def read_events(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an interaction file in file order: (user ids str array, item ids str array, timestamps float64).

    Raises :class:`DataFormatError` for a missing or empty file, a header lacking a required column, a line
    with the wrong number of fields, an empty id, or a non-numeric / non-finite timestamp (line numbers are
    1-based and count the header as line 1).
    """
    path = Path(path)
    text = _read_text(path)
    text = text.rstrip("\n")
    if not text.strip():
        raise DataFormatError(f"{path}: empty file (expected a header line {_HEADER!r})")
    header, _, body = text.partition("\n")
    columns = header.split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataFormatError(
            f"{path}: line 1: header {columns!r} lacks column(s) {missing}; "
            f"expected tab-separated {'/'.join(REQUIRED_COLUMNS)}"
        )
    if len(set(columns)) != len(columns):
        raise DataFormatError(f"{path}: line 1: duplicate column names in header {columns!r}")
    n_cols = len(columns)
    iu, ii, it = (columns.index(c) for c in REQUIRED_COLUMNS)
    if not body:
        return np.array([], dtype=str), np.array([], dtype=str), np.array([], dtype=np.float64)

    counts = _fields_per_line(body)
    bad = np.flatnonzero(counts != n_cols)
    if len(bad):
        line = int(bad[0])
        raise DataFormatError(
            f"{path}: line {line + 2}: expected {n_cols} tab-separated fields, found {int(counts[line])}"
        )
    fields = body.replace("\n", "\t").split("\t")
    users = np.array(fields[iu::n_cols])
    items = np.array(fields[ii::n_cols])
    ts_text = fields[it::n_cols]
    try:
        ts = np.array(ts_text, dtype=np.float64)
    except ValueError:
        ts = None
    if ts is None or not np.isfinite(ts).all():
        for k, value in enumerate(ts_text):
            try:
                ok = np.isfinite(float(value))
            except ValueError:
                ok = False
            if not ok:
                raise DataFormatError(
                    f"{path}: line {k + 2}: timestamp {value!r} is not a finite number of seconds"
                ) from None
    for name, arr in (("user_id", users), ("item_id", items)):
        empty = np.flatnonzero(arr == "")
        if len(empty):
            raise DataFormatError(f"{path}: line {int(empty[0]) + 2}: empty {name}")
    return users, items, ts
