"""The live catalogue: the served vocabulary with item metadata, the hidden flags, and the filter masks.

- **Metadata** (title, categories) is read once at start-up from an items file (``HYTREC_ITEMS_FILE``, else
  ``catalogue.tsv`` beside the checkpoint) through the model's vocabulary: ids the model does not know are
  counted and skipped, items without a line have no metadata. Licensed datasets' files are read where they
  lie (``../shared/data``), never copied into the repository.
- **Hidden flags** live in Redis (a set under the store's key prefix, shared by every model version and
  replica) with a change counter. Each worker polls the counter every ``HYTREC_CATALOGUE_POLL_MS`` (one GET)
  and re-reads the set when it moved, so a change reaches every worker within that interval plus a round
  trip, without a restart. A hidden item is never recommended; events on it are still applied.
- **Masks**: ``mask(...)`` turns one request's filters into an ``ItemMask`` (its own item indices to drop,
  the shared hidden tensor, or a cached bool of the items outside the asked categories with the hidden ones
  folded in), or None when nothing is filtered (the unfiltered hot path builds nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hytrec.model.serving import HiddenItems, ItemMask
from hytrec.model.vocab import FIRST_ITEM_ROW, Vocab
from hytrec.service import metrics
from hytrec.service.schemas import CatalogueItem, ItemPage
from hytrec.state_store import StateStore, StoreError

log = logging.getLogger("hytrec.service")
_EMPTY = torch.zeros(0, dtype=torch.int64)


def _indices(values: list[int]) -> torch.Tensor:
    """int64 tensor of a list (through an array buffer: a third of ``torch.tensor``'s cost per request)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64) if values else _EMPTY


@dataclass(frozen=True, slots=True)
class Filters:
    """One request's filters, as the routes parse them (ids and names, not yet rows)."""

    exclude: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    exclude_seen: bool = True
    offset: int = 0


class UnknownCategory(ValueError):
    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(f"unknown categories: {', '.join(repr(n) for n in names[:10])}")
        self.names = list(names)


def read_items_file(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``item id -> (title, categories)`` from a TSV with a header (``item_id``, ``title``, optional ``genres``
    joined by ``|``) or MovieLens ``movies.dat`` lines (``id::title::genres``, Latin-1)."""
    out: dict[str, tuple[str, list[str]]] = {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # movies.dat
    lines = text.splitlines()
    if lines and "::" in lines[0] and "\t" not in lines[0]:
        for line in lines:
            parts = line.split("::")
            if len(parts) >= 3:
                out[parts[0]] = (parts[1], [g for g in parts[2].split("|") if g])
        return out
    rows = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    for row in rows:
        item = (row.get("item_id") or "").strip()
        if item:
            genres = row.get("genres") or row.get("categories") or ""
            out[item] = ((row.get("title") or "").strip(), [g for g in genres.strip().split("|") if g])
    return out


class Catalogue:
    """The served items: ids in row order, popularity, metadata, the hidden set; see the module docstring."""

    def __init__(self, vocab: Vocab, metadata: dict[str, tuple[str, list[str]]] | None = None) -> None:
        self.vocab = vocab
        self.ids = vocab.ids
        self.popularity = vocab.popularity.tolist()
        self.n = len(self.ids)
        self.titles: dict[int, str] = {}
        self.item_categories: dict[int, list[str]] = {}
        members: dict[str, list[int]] = {}
        self.unknown_in_file = 0
        for item, (title, cats) in (metadata or {}).items():
            row = vocab.row(item)
            if not vocab.knows(item):
                self.unknown_in_file += 1
                continue
            index = row - FIRST_ITEM_ROW
            self.titles[index] = title
            self.item_categories[index] = cats
            for c in cats:
                members.setdefault(c, []).append(index)
        self.categories: dict[str, torch.Tensor] = {c: torch.tensor(sorted(v)) for c, v in sorted(members.items())}
        self.hidden_ids: frozenset[str] = frozenset()
        self.hidden_rows: torch.Tensor | None = None  # sorted hidden item indices; None while nothing is hidden
        self._outside_cache: dict[tuple[str, ...], tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._hidden: HiddenItems | None = None  # hidden_rows with its bool table, shared by the masks
        self._hidden_only: ItemMask | None = None  # the mask of a request without filters of its own
        self.hidden_version = -1
        self._task: asyncio.Task | None = None

    @classmethod
    def load(cls, vocab: Vocab, path: Path | None) -> Catalogue:
        if path is None:
            return cls(vocab)
        cat = cls(vocab, read_items_file(path))
        log.info(
            "catalogue: metadata for %d of %d items from %s (%d ids in the file unknown to the model, ignored)",
            len(cat.item_categories),
            cat.n,
            path,
            cat.unknown_in_file,
        )
        return cat

    # ------------------------------------------------------------------------------ lookups and pages
    def index(self, item_id: str) -> int | None:
        """Item index (row - FIRST_ITEM_ROW) of a known id, else None."""
        return self.vocab.row(item_id) - FIRST_ITEM_ROW if self.vocab.knows(item_id) else None

    def item(self, index: int) -> CatalogueItem:
        item_id = self.ids[index]
        return CatalogueItem(
            item_id=item_id,
            popularity=self.popularity[index],
            title=self.titles.get(index),
            categories=self.item_categories.get(index, []),
            hidden=item_id in self.hidden_ids,
        )

    def page(self, offset: int, limit: int) -> ItemPage:
        end = min(offset + limit, self.n)
        return ItemPage(
            items=[self.item(i) for i in range(offset, end)],
            total=self.n,
            offset=offset,
            next_offset=end if end < self.n else None,
        )

    # ------------------------------------------------------------------------------------------ masks
    def check_categories(self, names: Iterable[str]) -> None:
        unknown = [c for c in names if c not in self.categories]
        if unknown:
            raise UnknownCategory(unknown)

    def mask(self, f: Filters, never: Iterable[str] = ()) -> ItemMask | None:
        """Items the filters remove (exclude_seen's ring buffer is the model's), or None when none: built from
        indices, so its cost grows with the ids named, not with the catalogue. The hidden items are one shared
        tensor (or, with categories, folded into the cached union), never copied per request; a request with
        no filter of its own gets the one shared hidden-only mask."""
        drop = self.vocab.indices(f.exclude)
        if f.exclude_seen and never:
            drop += self.vocab.indices(never)
        if f.categories:
            outside, count, keep = self._outside(tuple(sorted(set(f.categories))))
            return ItemMask(_indices(drop), outside, count, keep)
        if not drop:
            return self._hidden_only
        return ItemMask(_indices(drop), hidden=self._hidden)

    def _outside(self, names: tuple[str, ...]) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Bool (n,): True for the items in none of the categories or hidden (the last unions asked are cached
        for the current hidden set, shared read-only by the masks; each costs n bytes)."""
        cache, hidden = self._outside_cache, self.hidden_rows  # one hidden version's (apply_hidden swaps both)
        hit = cache.get(names)
        if hit is None:
            mask = torch.ones(self.n, dtype=torch.bool)
            for c in names:
                mask[self.categories[c]] = False
            if hidden is not None:
                mask[hidden] = True
            keep = (~mask).nonzero().flatten()
            hit = (mask, self.n - int(keep.numel()), keep)
            if len(cache) >= 64:
                cache.pop(next(iter(cache)), None)
            cache[names] = hit
        return hit

    # ------------------------------------------------------------------------------------ hidden flags
    def apply_hidden(self, version: int, ids: set[str]) -> None:
        """Adopt a hidden set read from Redis (ids this model does not know are kept there, ignored here)."""
        rows = sorted({i for i in (self.index(x) for x in ids) if i is not None})
        hidden = torch.tensor(rows, dtype=torch.int64) if rows else None
        shared = HiddenItems.of(rows, self.n) if rows else None
        self.hidden_ids, self.hidden_rows, self.hidden_version = frozenset(ids), hidden, version
        self._hidden, self._hidden_only = shared, ItemMask(_EMPTY, hidden=shared) if shared is not None else None
        # rebound after hidden_rows, not cleared: a union being built meanwhile in the torch thread (which reads
        # the cache first) lands in the old dict, never in the new one with the old hidden set
        self._outside_cache = {}
        metrics.HIDDEN_ITEMS.set(len(rows))

    async def refresh(self, store: StateStore) -> bool:
        """Re-read the hidden set when its counter moved; True if it did."""
        if await store.hidden_version() == self.hidden_version:
            return False
        version, ids = await store.hidden_items()
        self.apply_hidden(version, ids)
        return True

    async def watch(self, store: StateStore, interval_s: float) -> None:
        """Read the hidden flags now, then poll the counter in the background (once the store is open)."""

        async def poll() -> None:
            try:
                await self.refresh(store)
            except (StoreError, OSError) as exc:  # Redis away: keep the last known flags, try again
                log.warning("catalogue: cannot read the hidden items (%s); keeping the last known set", exc)

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                await poll()

        await poll()

        if self._task is None:
            self._task = asyncio.create_task(loop(), name="catalogue-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
