"""Interaction logs: loading, item vocabulary, leave-one-out split and padded batches.

File format: tab-separated text, plain or gzip (detected by magic bytes), a header line naming the columns
``user_id``, ``item_id`` and ``timestamp`` (any order; extra columns are allowed and ignored), then one event
a line. Ids are kept as strings; timestamps are numeric seconds (int or float), stored as float64.

Layout in memory (:class:`Interactions`): one sequence per user in CSR form: vocab rows
``items[offsets[u]:offsets[u+1]]`` and ``timestamps`` over the same slice, each user's events sorted by
time with ties kept in file order.
Item rows come from :class:`ItemVocab`: row 0 is padding, row 1 the unknown item, rows 2.. the items.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
GZIP_MAGIC = b"\x1f\x8b"
_HEADER = "\t".join(REQUIRED_COLUMNS)

# History-length buckets for per-bucket metrics: [0, 100), [100, 500), [500, 1000), [1000, inf).
BUCKET_EDGES = (100, 500, 1000)
BUCKET_LABELS = ("<100", "100-499", "500-999", ">=1000")


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


# --------------------------------------------------------------------------------------------- vocabulary


class ItemVocab:
    """External item ids (str) <-> embedding rows. Row 0 = padding, row 1 = unknown item, rows 2.. = items."""

    PAD = 0
    UNK = 1
    OFFSET = 2
    _FORMAT = "hytrec-item-vocab"

    def __init__(self, ids: Sequence[str]) -> None:
        """``ids`` in row order (row ``OFFSET + k`` is ``ids[k]``); they must be unique non-empty strings."""
        self._ids = np.array([str(x) for x in ids], dtype=str) if len(ids) else np.array([], dtype=str)
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted = self._ids[self._order]
        if len(self._sorted) > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            raise ValueError("ItemVocab: duplicate item ids")

    @classmethod
    def build(cls, ids: Iterable[str]) -> ItemVocab:
        """Vocabulary of the distinct ids, in sorted (string) order for determinism."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=str)
        return cls(np.unique(arr).tolist())

    @property
    def n_items(self) -> int:
        """Number of real items."""
        return len(self._ids)

    @property
    def n_rows(self) -> int:
        """Rows of an embedding table for this vocabulary (items + padding + unknown)."""
        return len(self._ids) + self.OFFSET

    @property
    def ids(self) -> list[str]:
        """Item ids in row order (row ``OFFSET + k`` is ``ids[k]``)."""
        return self._ids.tolist()

    def __len__(self) -> int:
        return self.n_items

    def __contains__(self, item_id: object) -> bool:
        return int(self.encode([str(item_id)])[0]) != self.UNK

    def encode(self, ids: Iterable[str] | np.ndarray) -> np.ndarray:
        """Rows (int64) of the given ids; unknown ids map to ``UNK`` (1)."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=str)
        out = np.full(arr.shape, self.UNK, dtype=np.int64)
        if not len(self._sorted) or not arr.size:
            return out
        pos = np.searchsorted(self._sorted, arr)
        pos_c = np.minimum(pos, len(self._sorted) - 1)
        hit = self._sorted[pos_c] == arr
        out[hit] = self._order[pos_c[hit]] + self.OFFSET
        return out

    def decode(self, rows: Iterable[int] | np.ndarray) -> list[str]:
        """Item ids of the given rows; row 0 decodes to ``"<pad>"``, row 1 to ``"<unk>"``."""
        r = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64).ravel()
        if r.size and (r.min() < 0 or r.max() >= self.n_rows):
            raise ValueError(f"ItemVocab.decode: rows must lie in [0, {self.n_rows}), got {r.min()}..{r.max()}")
        special = {self.PAD: "<pad>", self.UNK: "<unk>"}
        return [special[x] if x < self.OFFSET else str(self._ids[x - self.OFFSET]) for x in r.tolist()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": self._FORMAT,
            "version": 1,
            "pad_row": self.PAD,
            "unk_row": self.UNK,
            "items": self.ids,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ItemVocab:
        """Inverse of :meth:`to_dict`."""
        if obj.get("format") != cls._FORMAT or obj.get("version") != 1:
            raise ValueError(f"not a {cls._FORMAT} v1 document")
        return cls(obj["items"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ItemVocab:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ItemVocab:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocab) and np.array_equal(self._ids, other._ids)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ItemVocab(n_items={self.n_items})"


# --------------------------------------------------------------------------------------------- sequences


@dataclass(frozen=True, eq=False)
class Interactions:
    """Per-user event sequences in CSR form, each sorted by time (ties in file order).

    ``items[offsets[u]:offsets[u + 1]]`` (int64 vocab rows) and ``timestamps[...]`` (float64 seconds) are
    sequence ``u``, whose external id is ``user_ids[u]``.
    """

    user_ids: list[str]
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    vocab: ItemVocab

    @classmethod
    def from_file(cls, path: str | Path, vocab: ItemVocab | None = None) -> Interactions:
        """Load a file; build the vocabulary from its items unless ``vocab`` is given (then unknown -> row 1).

        Users keep their order of first appearance in the file.
        """
        users, items, ts = read_events(path)
        return cls.from_events(users, items, ts, vocab)

    @classmethod
    def from_events(
        cls,
        users: Sequence[str] | np.ndarray,
        items: Sequence[str] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
        vocab: ItemVocab | None = None,
    ) -> Interactions:
        """Build from parallel arrays of events in file order (see :meth:`from_file`)."""
        users = np.asarray(users, dtype=str)
        items = np.asarray(items, dtype=str)
        ts = np.asarray(timestamps, dtype=np.float64)
        if not (len(users) == len(items) == len(ts)):
            raise ValueError("users, items and timestamps must have the same length")
        if vocab is None:
            vocab = ItemVocab.build(items)
        uniq, first, inverse = np.unique(users, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")  # users in order of first appearance
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[by_first] = np.arange(len(uniq))
        code = rank[inverse.ravel()]
        order = np.lexsort((ts, code))  # stable: equal (user, ts) keep file order
        counts = np.bincount(code, minlength=len(uniq))
        offsets = np.zeros(len(uniq) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(
            user_ids=uniq[by_first].tolist(),
            offsets=offsets,
            items=vocab.encode(items[order]),
            timestamps=ts[order],
            vocab=vocab,
        )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """Events per sequence (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.n_users

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, timestamps) of sequence ``u`` (views, do not modify)."""
        lo, hi = self.offsets[u], self.offsets[u + 1]
        return self.items[lo:hi], self.timestamps[lo:hi]

    def take_prefixes(self, lengths: np.ndarray, index: np.ndarray | None = None) -> Interactions:
        """New CSR holding the first ``lengths[k]`` events of sequence ``index[k]`` (default: every user)."""
        index = np.arange(self.n_users) if index is None else np.asarray(index, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) != len(index) or (lengths < 0).any() or (lengths > self.lengths[index]).any():
            raise ValueError("take_prefixes: lengths must lie in [0, sequence length]")
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(self.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Interactions(
            user_ids=[self.user_ids[i] for i in index.tolist()],
            offsets=offsets,
            items=self.items[gather],
            timestamps=self.timestamps[gather],
            vocab=self.vocab,
        )


# --------------------------------------------------------------------------------------------- split


@dataclass(frozen=True, eq=False)
class EvalSet:
    """One prediction per evaluated user: the history the model sees, the target and the request time.

    ``history`` is an :class:`Interactions` whose sequence ``k`` is the history of prediction ``k``;
    ``user_index[k]`` is that user's index in the full data.
    """

    history: Interactions
    targets: np.ndarray  # int64 vocab rows, (n,)
    request_ts: np.ndarray  # float64 seconds, (n,)
    user_index: np.ndarray  # int64, (n,)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def history_lengths(self) -> np.ndarray:
        return self.history.lengths

    @property
    def buckets(self) -> np.ndarray:
        """History-length bucket of each prediction (see :func:`length_buckets`)."""
        return length_buckets(self.history.lengths)


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out split. ``train``: per user, every event but the last two (all events for users with
    fewer than 3); ``valid``: history = train events, target = second last; ``test``: history = every event
    but the last (train + valid), target = last."""

    data: Interactions
    train: Interactions
    valid: EvalSet
    test: EvalSet


def leave_one_out(data: Interactions) -> Split:
    """Leave-one-out per user: last event = test, second last = validation, the rest = train.

    Users with fewer than 3 events are kept whole in ``train`` and get no validation or test prediction
    (they cannot supply a training prefix, a validation and a test event). Request time = the target's
    timestamp.
    """
    lengths = data.lengths
    evaluated = np.flatnonzero(lengths >= 3)
    train_len = np.where(lengths >= 3, lengths - 2, lengths)
    train = data.take_prefixes(train_len)
    last = data.offsets[1:][evaluated] - 1

    def eval_set(history_len: np.ndarray, target_pos: np.ndarray) -> EvalSet:
        return EvalSet(
            history=data.take_prefixes(history_len, evaluated),
            targets=data.items[target_pos],
            request_ts=data.timestamps[target_pos],
            user_index=evaluated.astype(np.int64),
        )

    valid = eval_set(lengths[evaluated] - 2, last - 1)
    test = eval_set(lengths[evaluated] - 1, last)
    return Split(data=data, train=train, valid=valid, test=test)


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """Bucket index (int64, 0..3, labels :data:`BUCKET_LABELS`) of each history length.

    The evaluator buckets by the length of the history the model sees for the prediction (for the test
    prediction: every event but the last, so a user with exactly 500 events falls in ``100-499``).
    """
    return np.searchsorted(np.asarray(BUCKET_EDGES), np.asarray(lengths), side="right").astype(np.int64)


# --------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True, eq=False)
class Batch:
    """Right-padded sequences. Padding: item row 0, timestamp = the sequence's last real timestamp.

    ``index[b]`` is the sequence's index in the source :class:`Interactions`.
    """

    items: np.ndarray  # int64 (B, L)
    timestamps: np.ndarray  # float64 (B, L)
    lengths: np.ndarray  # int64 (B,)
    index: np.ndarray  # int64 (B,)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        """Padded size B * L."""
        return int(self.items.size)

    def to_torch(self, device: Any = "cpu") -> dict[str, Any]:
        """Tensors ``items``, ``timestamps`` (float64), ``lengths``, ``index`` on ``device``."""
        import torch

        return {
            name: torch.from_numpy(getattr(self, name)).to(device)
            for name in ("items", "timestamps", "lengths", "index")
        }


def make_batch(data: Interactions, index: np.ndarray, max_len: int | None = None) -> Batch:
    """Pad sequences ``index`` of ``data`` (each truncated to its LAST ``max_len`` events if given)."""
    index = np.asarray(index, dtype=np.int64)
    full = data.lengths[index]
    used = full if max_len is None else np.minimum(full, max_len)
    width = int(used.max()) if len(used) else 0
    start = data.offsets[index] + (full - used)
    col = np.arange(width)
    gather = start[:, None] + np.minimum(col[None, :], np.maximum(used - 1, 0)[:, None])
    pad = col[None, :] >= used[:, None]
    if data.n_events:
        items = data.items[gather]
        ts = data.timestamps[gather]
    else:
        items = np.zeros((len(index), width), dtype=np.int64)
        ts = np.zeros((len(index), width), dtype=np.float64)
    items[pad] = ItemVocab.PAD
    ts[used == 0] = 0.0
    return Batch(items=items, timestamps=ts, lengths=used.astype(np.int64), index=index)


def _pack(order: np.ndarray, lengths: np.ndarray, max_tokens: int, max_batch_size: int | None) -> list[np.ndarray]:
    """Greedily cut ``order`` (sorted by ascending length) into runs whose padded size fits ``max_tokens``.

    A sequence longer than ``max_tokens`` forms a batch of its own (never truncated here).
    """
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    cap = max_batch_size or n
    while start < n:
        end = start + 1
        while end < n and end - start < cap and (end - start + 1) * int(lengths[order[end]]) <= max_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def train_batches(
    data: Interactions,
    max_tokens: int,
    *,
    seed: int | np.random.Generator = 0,
    max_len: int | None = None,
    max_batch_size: int | None = None,
    min_len: int = 2,
    bucket_size: int | None = None,
) -> Iterator[Batch]:
    """One shuffled epoch of length-bucketed, padded batches.

    Sequences (truncated to their last ``max_len`` events if given; shorter than ``min_len`` skipped) are
    shuffled, grouped into buckets of ``bucket_size`` sequences (default: one bucket), sorted by length in
    each bucket (random order among equal lengths) and packed so that batch size x padded length <=
    ``max_tokens`` (and batch size <= ``max_batch_size``); a longer sequence is a batch on its own. Batch
    order is then shuffled. ``seed``: an int or a numpy Generator (pass one Generator across epochs).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lengths = data.lengths if max_len is None else np.minimum(data.lengths, max_len)
    keep = np.flatnonzero(lengths >= max(min_len, 1))
    keep = keep[rng.permutation(len(keep))]
    step = bucket_size or max(len(keep), 1)
    batches: list[np.ndarray] = []
    for lo in range(0, len(keep), step):
        chunk = keep[lo : lo + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_pack(chunk, lengths, max_tokens, max_batch_size))
    for b in rng.permutation(len(batches)):
        yield make_batch(data, batches[b], max_len)


def eval_batches(
    data: Interactions,
    max_tokens: int,
    *,
    max_len: int | None = None,
    max_batch_size: int | None = None,
) -> Iterator[Batch]:
    """Deterministic batches covering every non-empty sequence once, by ascending length (ties by index).

    Use ``batch.index`` to match rows with per-sequence arrays (e.g. ``EvalSet.targets[batch.index]``).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    lengths = data.lengths if max_len is None else np.minimum(data.lengths, max_len)
    keep = np.flatnonzero(lengths >= 1)
    order = keep[np.argsort(lengths[keep], kind="stable")]
    for idx in _pack(order, lengths, max_tokens, max_batch_size):
        yield make_batch(data, idx, max_len)
