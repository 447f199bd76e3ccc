"""The event-ingest use case: a validated batch in, every user's state advanced and written atomically.

Steps: map item ids to embedding rows (strict mode rejects the whole batch if one is unknown); group the
events by user keeping their order; drop repeated ``(user, event_id)`` pairs inside the batch; then one
``StateStore.update_many``: one round trip reads every user's state blob and which of their event ids are
already applied, ``compute`` (in the torch thread) skips those, decodes the blobs, advances all users
together through the batched TADN step and encodes the new states, and a per-user compare-and-set writes
state and ring buffer together (recomputing the users that lost a race).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hytrec.model.serving import ServingModel
from hytrec.model.vocab import UNKNOWN_ROW
from hytrec.service import metrics
from hytrec.service.errors import field_problem
from hytrec.service.schemas import Event, IngestResult
from hytrec.service.states import decode_snapshot
from hytrec.state_store import Snapshot, StateStore, Write


@dataclass
class _Pending:
    """One user's events of a batch, in order: (row, ts, event_id or None)."""

    events: list[tuple[int, float, str | None]] = field(default_factory=list)

    @property
    def event_ids(self) -> list[str]:
        return [e for _, _, e in self.events if e is not None]


@dataclass
class _Outcome:
    """Per-user counts of the latest compute run (a retried user is recounted)."""

    applied: int = 0
    duplicates: int = 0
    unknown: int = 0
    out_of_order: int = 0


class EventIngestor:
    """Applies event batches to the store with the model; see the module docstring."""

    def __init__(self, model: ServingModel, store: StateStore, strict_items: bool = False) -> None:
        self.model = model
        self.store = store  # runs ``compute`` through the runner it was opened with (the torch thread)
        self.strict_items = strict_items

    def _check_items(self, events: Sequence[Event]) -> None:
        unknown = [(i, e.item_id) for i, e in enumerate(events) if not self.model.knows(e.item_id)]
        if unknown:
            errors = [
                {"field": f"events[{i}].item_id", "in": "body", "message": f"unknown item {item!r}", "type": "unknown"}
                for i, item in unknown[:100]
            ]
            detail = f"{len(unknown)} event(s) name items the model does not know (strict mode); nothing applied"
            metrics.EVENTS.labels("rejected").inc(len(events))
            raise field_problem(errors, detail)

    async def ingest(self, events: Sequence[Event]) -> IngestResult:
        """Apply a batch; returns the counts. Raises the store's errors (nothing of a failed user is written)."""
        start = time.perf_counter()
        if self.strict_items:
            self._check_items(events)
        pending: dict[str, _Pending] = {}
        seen: set[tuple[str, str]] = set()
        batch_dups = 0
        for e in events:
            if e.event_id is not None:
                if (e.user_id, e.event_id) in seen:
                    batch_dups += 1
                    continue
                seen.add((e.user_id, e.event_id))
            pending.setdefault(e.user_id, _Pending()).events.append((self.model.row(e.item_id), e.ts, e.event_id))
        outcomes: dict[str, _Outcome] = {}

        def compute(snaps: dict[str, Snapshot]) -> Mapping[str, Write]:
            return self._compute(snaps, pending, outcomes)

        asked = {u: p.event_ids for u, p in pending.items() if p.event_ids}
        commits = await self.store.update_many(list(pending), compute, event_ids=asked)
        for c in commits.values():
            metrics.CAS_ATTEMPTS.observe(c.attempts)
        total = _Outcome()
        for o in outcomes.values():
            total.applied += o.applied
            total.duplicates += o.duplicates
            total.unknown += o.unknown
            total.out_of_order += o.out_of_order
        total.duplicates += batch_dups
        for name, n in (
            ("applied", total.applied),
            ("duplicate", total.duplicates),
            ("unknown_item", total.unknown),
            ("out_of_order", total.out_of_order),
        ):
            if n:
                metrics.EVENTS.labels(name).inc(n)
        metrics.EVENT_BATCH_SECONDS.observe(time.perf_counter() - start)
        return IngestResult(
            applied=total.applied,
            duplicates=total.duplicates,
            unknown_items=total.unknown,
            out_of_order=total.out_of_order,
            users=len(pending),
        )

    def _compute(
        self, snaps: dict[str, Snapshot], pending: dict[str, _Pending], outcomes: dict[str, _Outcome]
    ) -> dict[str, Write]:
        """Runs in the torch thread: skip applied event ids, advance every user at once, encode."""
        users, states, todo = [], [], []
        for u, snap in snaps.items():
            fresh = [(r, t, eid) for r, t, eid in pending[u].events if eid is None or eid not in snap.applied]
            out = _Outcome(duplicates=len(pending[u].events) - len(fresh))
            outcomes[u] = out
            if not fresh:
                continue
            state = decode_snapshot(self.model, snap)  # None for a new user; CorruptStateError if undecodable
            last = float(state.last_ts[0]) if state is not None and int(state.count[0]) > 0 else None
            for r, t, _ in fresh:
                if last is not None and t < last:
                    out.out_of_order += 1
                last = t if last is None else max(last, t)
                out.unknown += r == UNKNOWN_ROW
            out.applied = len(fresh)
            users.append(u)
            states.append(state)
            todo.append(fresh)
        if not users:
            return {}
        advanced = self.model.advance(states, [[(r, t) for r, t, _ in ev] for ev in todo])
        writes = {}
        for i, (u, ev) in enumerate(zip(users, todo, strict=True)):
            ids = tuple(eid for _, _, eid in ev if eid is not None)
            blob = self.model.encode(advanced.user(i))
            writes[u] = Write(blob, ids, len(ev), max(t for _, t, _ in ev))
        return writes
