"""Helpers of the service fault tests: a small open-loop driver that keeps every answer, event batches with
ids, and a reader that decodes every user's stored state straight from Redis.

The driver is open loop like ``hytrec loadtest`` (requests leave on a Poisson schedule fixed in advance, each
on its own task, latency from the scheduled time) but records each request with its batch, status and
headers, which the fault tests need to tell acknowledged events from the rest.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

from hytrec.model.serving import ServingModel
from hytrec.service.states import decode_snapshot
from hytrec.state_store import Snapshot
from hytrec.state_store.keys import KeySpace

TYPE_BASE = "https://hytrec.dev/problems/"


@dataclass
class Batch:
    """One POST /v1/events body: events with unique ids, over a few users."""

    n: int
    events: list[dict[str, Any]]

    @property
    def ids(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for e in self.events:
            out.setdefault(e["user_id"], set()).add(e["event_id"])
        return out


@dataclass
class Answer:
    """What one request got: status 0 is a transport error or the client's timeout (``error`` says which)."""

    what: str
    sched: float  # seconds after the load started
    done: float
    status: int
    retry_after: str | None = None
    kind: str | None = None  # problem type without the base URL
    error: str | None = None
    batch: Batch | None = None
    may_have_applied: bool | None = None  # what a post's 503 said (None: the member was absent)

    @property
    def latency(self) -> float:
        return self.done - self.sched


class EventFeed:
    """Batches of ``size`` events over ``per_batch`` of ``users`` users (round robin), ids ``<tag>-<n>-<j>``."""

    def __init__(self, tag: str, items: list[str], users: int = 50, size: int = 5, per_batch: int = 2) -> None:
        self.tag, self.items, self.size, self.per_batch = tag, items, size, per_batch
        self.users = [f"{tag}-u{i}" for i in range(users)]
        self.batches: list[Batch] = []
        self._ts = 1.7e9

    def next(self) -> Batch:
        n = len(self.batches)
        chosen = [self.users[(n * self.per_batch + k) % len(self.users)] for k in range(self.per_batch)]
        events = []
        for j in range(self.size):
            self._ts += 1.0
            events.append(
                {
                    "user_id": chosen[j % len(chosen)],
                    "item_id": self.items[(n * self.size + j) % len(self.items)],
                    "ts": self._ts,
                    "event_id": f"{self.tag}-{n}-{j}",
                }
            )
        batch = Batch(n, events)
        self.batches.append(batch)
        return batch


def ids_of(batches: Iterable[Batch]) -> dict[str, set[str]]:
    """Event ids per user over ``batches``."""
    out: dict[str, set[str]] = {}
    for b in batches:
        for u, ids in b.ids.items():
            out.setdefault(u, set()).update(ids)
    return out


def _answer(what: str, sched: float, start: float, resp: httpx.Response, batch: Batch | None) -> Answer:
    kind, landed = None, None
    if resp.status_code >= 400:
        try:
            body = resp.json()
            kind, landed = str(body.get("type", "")).removeprefix(TYPE_BASE), body.get("may_have_applied")
        except ValueError:
            kind = "not-json"
    done = time.monotonic() - start
    return Answer(what, sched, done, resp.status_code, resp.headers.get("retry-after"), kind, None, batch, landed)


def check_not_applied(answers: Iterable[Answer], stored: dict[str, Any]) -> int:
    """Every post answered 503 without ``may_have_applied: true`` left nothing in the store (``stored``: user ->
    a ``Stored``, read after the load): the half of the re-send rule that needs no de-duplication window.
    Returns how many such posts were checked."""
    n = 0
    for a in answers:
        if a.what != "events" or a.status != 503 or a.may_have_applied is True or a.batch is None:
            continue
        n += 1
        for user, ids in a.batch.ids.items():
            held = stored[user].ids & ids if user in stored else set()
            assert not held, f"a 503 said nothing was applied ({a.kind}), yet {sorted(held)} of {user} landed"
    return n


async def open_loop(
    url: str,
    rate: float,
    seconds: float,
    feed: EventFeed | None,
    *,
    events_share: float = 1.0,
    timeout: float = 5.0,
    seed: int = 0,
    read_users: list[str] | None = None,
    start: float | None = None,
) -> list[Answer]:
    """Send Poisson arrivals at ``rate`` for ``seconds``: event posts from ``feed`` (``events_share`` of them),
    recommendation reads of ``read_users`` otherwise. Every request ends as one ``Answer``; times are seconds
    after ``start`` (``time.monotonic()``, default now), so a fault run beside it can share the clock."""
    rng = random.Random(seed)
    answers: list[Answer] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(what: str, sched: float, batch: Batch | None, path: str) -> None:
            try:
                if batch is not None:
                    resp = await client.post(path, json={"events": batch.events})
                else:
                    resp = await client.get(path)
            except httpx.TimeoutException as exc:
                answers.append(Answer(what, sched, time.monotonic() - start, 0, error=f"timeout {exc!r}", batch=batch))
            except httpx.TransportError as exc:
                answers.append(Answer(what, sched, time.monotonic() - start, 0, error=repr(exc), batch=batch))
            else:
                answers.append(_answer(what, sched, start, resp, batch))

        tasks = []
        start = time.monotonic() if start is None else start
        t = rng.expovariate(rate)
        while t < seconds:
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if feed is not None and (not read_users or rng.random() < events_share):
                batch = feed.next()
                tasks.append(asyncio.create_task(one("events", t, batch, "/v1/events")))
            else:
                user = rng.choice(read_users or ["nobody"])
                tasks.append(asyncio.create_task(one("recommend", t, None, f"/v1/users/{user}/recommendations?k=5")))
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return answers


async def with_fault(load: Awaitable[list[Answer]], fault: Callable[[], Awaitable[Any]]) -> tuple[list[Answer], Any]:
    """Run ``load`` and, at the same time, ``fault()``; return both results."""
    load_task = asyncio.ensure_future(load)
    try:
        out = await fault()
    except BaseException:
        load_task.cancel()
        raise
    return await load_task, out


def statuses(answers: Iterable[Answer]) -> Counter:
    """Answers by status (``"503 unavailable"`` carries the problem type; 0 is no answer)."""
    return Counter(f"{a.status} {a.kind}" if a.kind else str(a.status) for a in answers)


async def resend(url: str, batches: Iterable[Batch], timeout: float = 10.0, tries: int = 50) -> list[httpx.Response]:
    """Post each batch until it gets a 200 (a 503 is retried after a short pause); the final answers."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        for b in batches:
            for _ in range(tries):
                resp = await client.post("/v1/events", json={"events": b.events})
                if resp.status_code != 503:
                    break
                await asyncio.sleep(0.1)
            out.append(resp)
    return out


@dataclass
class Stored:
    """A user's state as held in Redis: the event count (hash and decoded blob agree) and the applied ids."""

    count: int
    ids: set[str] = field(default_factory=set)


def read_states(client: redis.Redis, model: ServingModel, prefix: str, users: Iterable[str]) -> dict[str, Stored]:
    """Every user's state read straight from Redis and decoded with the service's own decoder.

    Raises (``CorruptStateError``, ``AssertionError``) on a blob that does not decode, or whose event count
    disagrees with the hash's: a half-written state. Users without state are left out.
    """
    keys = KeySpace(prefix, model.version)
    out: dict[str, Stored] = {}
    for user in users:
        blob, ver, n = client.hmget(keys.state(user), ["blob", "ver", "n"])
        if blob is None and ver is None:
            continue
        snap = Snapshot(user, int(ver), blob, model_version=model.version)
        state = decode_snapshot(model, snap)
        assert state is not None and int(state.count[0]) == int(n), (user, int(state.count[0]), n)
        ids = {m.decode() for m in client.zrange(keys.dedup(user), 0, -1)}
        out[user] = Stored(int(n), ids)
    return out
