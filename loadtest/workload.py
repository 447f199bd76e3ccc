"""What the generator sends and when: Poisson arrival times, the endpoint mix, Zipf users, catalogue items.

Everything random draws from one seeded ``random.Random`` per generator process, so a run is reproducible and
processes (each with its own seed) send independent streams whose superposition is again Poisson.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import time
from dataclasses import dataclass, field

from hytrec.loadtest.wire import Pool, Target, get_json, request_bytes

ENDPOINTS = ("recommend", "events", "hello")  # hello: GET / of the calibration endpoint


def parse_mix(text: str) -> dict[str, float]:
    """``recommend=0.8,events=0.2`` as shares summing to 1 (a bare name means weight 1)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {name!r} in --mix (known: {', '.join(ENDPOINTS)})")
        mix[name] = mix.get(name, 0.0) + (float(weight) if weight else 1.0)
    total = sum(mix.values())
    if not mix or total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError(f"--mix needs positive weights, got {text!r}")
    return {name: w / total for name, w in mix.items() if w > 0}


def parse_rates(text: str) -> list[float]:
    """``25,50,100`` as rates in req/s (each positive)."""
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates must be positive numbers, got {text!r}")
    return rates


def poisson_arrivals(rng: random.Random, rate: float, horizon: float, limit: int) -> list[float]:
    """Send offsets (s) of a Poisson process of ``rate`` on [0, horizon): i.i.d. exponential gaps, at most ``limit``.

    Fixed in advance, so how the server (or the generator's own loop) behaves cannot move an arrival.
    """
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < horizon and len(out) < limit:
        out.append(t)
        t += rng.expovariate(rate)
    return out


class Sampler:
    """Draws indices ``0..n-1`` with the given weights by bisecting the cumulative sum (O(log n) a draw)."""

    def __init__(self, weights: list[float]) -> None:
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("a sampler needs non-negative weights with a positive sum")
        self.cum = list(itertools.accumulate(weights))
        self.total = self.cum[-1]
        self.last = len(self.cum) - 1

    def __call__(self, rng: random.Random) -> int:
        return min(self.last, bisect.bisect_right(self.cum, rng.random() * self.total))


def zipf(n: int, s: float) -> Sampler:
    """Ranks ``0..n-1`` with P(rank r) proportional to 1 / (r + 1) ** s: a few hot users, a long tail."""
    return Sampler([1.0 / (r + 1) ** s for r in range(n)])


@dataclass
class Workload:
    """The requests of a run, picklable so that every generator process builds its own :class:`RequestMaker`."""

    mix: dict[str, float]
    users: int = 1000
    zipf_s: float = 1.1
    k: int = 10
    events_per_post: int = 1
    users_per_post: int = 1
    items: list[str] = field(default_factory=list)
    item_weights: list[float] | None = None  # None: uniform over ``items``
    user_prefix: str = "load-"
    api_key: str | None = None
    hello_path: str = "/"

    def check(self) -> None:
        if self.users < 1 or self.k < 1 or self.events_per_post < 1 or self.users_per_post < 1:
            raise ValueError("--users, --k, --events-per-post and --users-per-post must be at least 1")
        if "events" in self.mix and not self.items:
            raise ValueError("posting events needs item ids, and the catalogue (/v1/items) gave none")


class RequestMaker:
    """Builds the bytes of the next request; event timestamps increase within the process (wall clock based)."""

    def __init__(self, workload: Workload, target: Target, rng: random.Random) -> None:
        self.w, self.target, self.rng = workload, target, rng
        self.names = list(workload.mix)
        self.pick_endpoint = Sampler(list(workload.mix.values()))
        self.pick_user = zipf(workload.users, workload.zipf_s)
        self.pick_item = Sampler(workload.item_weights) if workload.item_weights else None
        self.last_ms = 0

    def pick(self) -> str:
        return self.names[self.pick_endpoint(self.rng)] if len(self.names) > 1 else self.names[0]

    def user(self) -> str:
        return f"{self.w.user_prefix}{self.pick_user(self.rng)}"

    def item(self) -> str:
        items = self.w.items
        return items[self.pick_item(self.rng)] if self.pick_item else items[self.rng.randrange(len(items))]

    def build(self, endpoint: str) -> bytes:
        w = self.w
        if endpoint == "recommend":
            path = f"/v1/users/{self.user()}/recommendations?k={w.k}"
            return request_bytes(self.target, "GET", path, api_key=w.api_key)
        if endpoint == "events":
            users = [self.user() for _ in range(min(w.users_per_post, w.events_per_post))]
            events = []
            for j in range(w.events_per_post):
                self.last_ms = max(self.last_ms + 1, int(time.time() * 1000))  # whole ms: strictly increasing
                events.append({"user_id": users[j % len(users)], "item_id": self.item(), "ts": self.last_ms / 1000})
            body = json.dumps({"events": events}, separators=(",", ":")).encode()
            return request_bytes(self.target, "POST", "/v1/events", body, api_key=w.api_key)
        return request_bytes(self.target, "GET", w.hello_path, api_key=w.api_key)


async def fetch_items(
    target: Target, api_key: str | None = None, page_size: int = 1000, max_items: int = 100_000
) -> tuple[list[str], list[int]]:
    """Item ids and popularities from the server's paged ``GET /v1/items``, following ``next_offset``."""
    pool = Pool(target)
    ids: list[str] = []
    pops: list[int] = []
    offset: int | None = 0
    try:
        while offset is not None and len(ids) < max_items:
            limit = min(page_size, max_items - len(ids))
            page = await get_json(pool, f"/v1/items?offset={offset}&limit={limit}", api_key)
            for item in page["items"]:
                ids.append(str(item["item_id"]))
                pops.append(int(item.get("popularity", 0)))
            nxt = page.get("next_offset")
            if nxt is not None and nxt <= offset:
                raise RuntimeError(f"/v1/items: next_offset {nxt} does not advance past {offset}")
            offset = nxt
    finally:
        pool.close()
    return ids, pops
