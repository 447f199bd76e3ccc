"""The item vocabulary: external item ids <-> embedding rows, and each item's training popularity.

One class for every user of item ids (training data, checkpoints, serving, metrics), so the row layout is
written down once: row :data:`PAD_ROW` is padding, :data:`UNKNOWN_ROW` the one row shared by every id the
vocabulary does not know, and items start at :data:`FIRST_ITEM_ROW` in the order of :attr:`Vocab.ids`.

On disk it is a checkpoint's ``items.json``: ``{"item_ids": [...], "popularity": [...]}``, ids in row order
and the training interactions per item (the cold-start fallback). Ids are strings; the model version does not
depend on this file.

Two lookups: :meth:`Vocab.encode` (numpy binary search over whole arrays, for loading training logs) and
:meth:`Vocab.row` (a dict built on first use, one id at a time, for serving).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

PAD_ROW = 0  # item-embedding row of padding
UNKNOWN_ROW = 1  # shared row of items the vocabulary does not know
FIRST_ITEM_ROW = 2  # row of Vocab.ids[0]; rows below it are never ranked
_SPECIAL = {PAD_ROW: "<pad>", UNKNOWN_ROW: "<unk>"}


class VocabError(ValueError):
    """An ``items.json`` (or id list) that cannot be a vocabulary: malformed, duplicate ids, length mismatch."""


def _as_str_array(ids: Iterable[str] | np.ndarray) -> np.ndarray:
    arr = ids if isinstance(ids, np.ndarray) else np.array([str(x) for x in ids], dtype=str)
    return arr.astype(str, copy=False) if arr.size else np.array([], dtype=str)


class Vocab:
    """Item ids in row order (``ids[k]`` is row ``FIRST_ITEM_ROW + k``) and their training popularity."""

    def __init__(
        self, item_ids: Sequence[str] | np.ndarray, popularity: Sequence[int] | np.ndarray | None = None
    ) -> None:
        """``item_ids``: unique strings in row order; ``popularity``: one count per id (default 0)."""
        self._ids = _as_str_array(item_ids)
        pop = np.zeros(len(self._ids), dtype=np.int64) if popularity is None else np.asarray(popularity)
        if pop.shape != self._ids.shape:
            raise VocabError(f"{len(pop)} popularity counts for {len(self._ids)} item ids")
        self._popularity = pop.astype(np.int64)
        # One sort serves the duplicate check and encode's binary search.
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted = self._ids[self._order]
        if len(self._sorted) > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            raise VocabError("duplicate item ids")
        self.ids: list[str] = self._ids.tolist()

    @classmethod
    def build(cls, item_ids: Iterable[str] | np.ndarray) -> Vocab:
        """Vocabulary of the distinct ids, in sorted (string) order so that it does not depend on file order."""
        return cls(np.unique(_as_str_array(item_ids)))

    def with_popularity(self, popularity: Sequence[int] | np.ndarray) -> Vocab:
        """The same ids with new counts (training counts them after the split)."""
        return Vocab(self._ids, popularity)

    # ------------------------------------------------------------------------------------------- sizes
    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def n_rows(self) -> int:
        """Rows of an embedding table for this vocabulary (special rows + items)."""
        return len(self.ids) + FIRST_ITEM_ROW

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def popularity(self) -> np.ndarray:
        """Training interactions per item (int64, aligned with :attr:`ids`)."""
        return self._popularity

    def by_popularity(self) -> np.ndarray:
        """Item indices (into :attr:`ids`) from most to least popular, ties in row order."""
        return np.argsort(-self._popularity, kind="stable")

    # ------------------------------------------------------------------------------ single ids (serving)
    @cached_property
    def _row_of(self) -> dict[str, int]:
        return {item: row for row, item in enumerate(self.ids, start=FIRST_ITEM_ROW)}

    def row(self, item_id: str) -> int:
        """Embedding row of one id; :data:`UNKNOWN_ROW` if the vocabulary does not know it."""
        return self._row_of.get(item_id, UNKNOWN_ROW)

    def knows(self, item_id: str) -> bool:
        return item_id in self._row_of

    def indices(self, item_ids: Iterable[str]) -> list[int]:
        """Item indices (row - FIRST_ITEM_ROW) of the known ids, in order, unknown ones skipped (one dict lookup
        each, no Python call per id: the serving filters build one list per request)."""
        return [r - FIRST_ITEM_ROW for r in map(self._row_of.get, item_ids) if r is not None]

    __contains__ = knows

    def item_id(self, row: int) -> str | None:
        """External id of an item row; None for the special rows."""
        return self.ids[row - FIRST_ITEM_ROW] if row >= FIRST_ITEM_ROW else None

    # ----------------------------------------------------------------------------- arrays (training)
    def encode(self, item_ids: Iterable[str] | np.ndarray) -> np.ndarray:
        """Rows (int64, same shape) of many ids at once; unknown ids map to :data:`UNKNOWN_ROW`."""
        arr = np.asarray(item_ids if isinstance(item_ids, np.ndarray) else list(item_ids), dtype=str)
        out = np.full(arr.shape, UNKNOWN_ROW, dtype=np.int64)
        ids, order = self._sorted, self._order
        if not len(ids) or not arr.size:
            return out
        pos = np.minimum(np.searchsorted(ids, arr), len(ids) - 1)
        hit = ids[pos] == arr
        out[hit] = order[pos[hit]] + FIRST_ITEM_ROW
        return out

    def decode(self, rows: Iterable[int] | np.ndarray) -> list[str]:
        """Ids of the given rows; the special rows decode to ``"<pad>"`` and ``"<unk>"``."""
        r = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64).ravel()
        if r.size and (r.min() < 0 or r.max() >= self.n_rows):
            raise ValueError(f"rows must lie in [0, {self.n_rows}), got {r.min()}..{r.max()}")
        return [_SPECIAL[x] if x < FIRST_ITEM_ROW else self.ids[x - FIRST_ITEM_ROW] for x in r.tolist()]

    # --------------------------------------------------------------------------------------- items.json
    def save(self, path: str | Path) -> None:
        """Write ``items.json`` (the format existing checkpoints hold; keep it byte-compatible)."""
        doc = {"item_ids": self.ids, "popularity": self._popularity.tolist()}
        Path(path).write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read ``items.json``; raises :class:`VocabError` if it is not one (and OSError if unreadable)."""
        try:
            doc = json.loads(Path(path).read_text())
            ids, popularity = [str(i) for i in doc["item_ids"]], [int(c) for c in doc["popularity"]]
        except (KeyError, TypeError, ValueError) as exc:  # ValueError covers JSONDecodeError and int("x")
            raise VocabError(f"{path}: not an items file: {exc!r}") from exc
        return cls(ids, popularity)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocab)
            and np.array_equal(self._ids, other._ids)
            and np.array_equal(self._popularity, other._popularity)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Vocab(n_items={self.n_items})"
