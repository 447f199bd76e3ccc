"""Async load generator for the HyTRec service: posts events and asks for recommendations, reports latencies.

    python -m hytrec.loadtest.run --url http://127.0.0.1:8000 --users 1000 --duration 30 --concurrency 16

Each of ``concurrency`` workers loops: with probability ``--event-share`` it posts a batch of
``--batch`` events for a random user (items drawn from the served catalogue, Zipf-like), else it asks for
that user's top-k. A warm-up phase (``--warmup`` seconds, not measured) gives users some history first.
Prints p50/p95/p99 latency per endpoint and throughput; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from hytrec.service.client import AsyncHyTRecClient, HyTRecError


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"events": [], "recommendations": []})
    errors: dict[str, int] = field(default_factory=lambda: {"events": 0, "recommendations": 0})
    events_posted: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


class Load:
    def __init__(self, args: argparse.Namespace, client: AsyncHyTRecClient, item_ids: list[str]) -> None:
        self.args = args
        self.client = client
        self.items = item_ids
        weights = [1.0 / (r + 1) ** 0.8 for r in range(len(item_ids))]
        self.cum = list(_accumulate(weights))
        self.clock = {u: 1_700_000_000.0 + random.random() * 1e6 for u in range(args.users)}

    def _events(self, user: int) -> list[dict]:
        out = []
        for _ in range(self.args.batch):
            self.clock[user] += random.expovariate(1 / 60.0)
            item = random.choices(self.items, cum_weights=self.cum)[0]
            out.append({"user_id": f"{self.args.prefix}{user}", "item_id": item, "ts": self.clock[user]})
        return out

    async def worker(self, stats: Stats | None, until: float) -> None:
        while time.perf_counter() < until:
            user = random.randrange(self.args.users)
            post = stats is None or random.random() < self.args.event_share
            name = "events" if post else "recommendations"
            start = time.perf_counter()
            try:
                if post:
                    batch = self._events(user)
                    await self.client.post_events(batch)
                else:
                    await self.client.recommendations(f"{self.args.prefix}{user}", k=self.args.k)
            except (HyTRecError, httpx.HTTPError):
                if stats is not None:
                    stats.errors[name] += 1
                continue
            if stats is not None:
                stats.latencies[name].append(time.perf_counter() - start)
                stats.events_posted += len(batch) if post else 0


def _accumulate(values: list[float]):
    total = 0.0
    for v in values:
        total += v
        yield total


async def run(args: argparse.Namespace) -> dict:
    async with AsyncHyTRecClient(
        args.url, api_key=args.api_key, timeout=args.timeout, retries=0, max_connections=args.concurrency
    ) as client:
        info = await client.model()
        load = Load(args, client, info_items(info.n_items, args.item_ids))
        if args.warmup > 0:
            until = time.perf_counter() + args.warmup
            await asyncio.gather(*(load.worker(None, until) for _ in range(args.concurrency)))
        stats = Stats()
        start = time.perf_counter()
        until = start + args.duration
        await asyncio.gather(*(load.worker(stats, until) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    report: dict = {
        "url": args.url,
        "model_version": info.version,
        "users": args.users,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 2),
        "batch_events": args.batch,
        "events_per_s": round(stats.events_posted / elapsed, 1),
        "endpoints": {},
    }
    for name, lat in stats.latencies.items():
        report["endpoints"][name] = {
            "requests": len(lat),
            "errors": stats.errors[name],
            "rps": round(len(lat) / elapsed, 1),
            **{f"p{q}_ms": round(percentile(lat, q) * 1000, 2) for q in (50, 95, 99)},
        }
    return report


def info_items(n_items: int, given: str | None) -> list[str]:
    """Item ids to send: from ``--item-ids`` (comma list) or "1".."n" (the ids of the synthetic datasets)."""
    if given:
        return [i for i in given.split(",") if i]
    return [str(i) for i in range(1, n_items + 1)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hytrec.loadtest.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--users", type=int, default=1000, help="Distinct users.")
    p.add_argument("--duration", type=float, default=30.0, help="Measured seconds.")
    p.add_argument("--warmup", type=float, default=5.0, help="Unmeasured seconds of event posting first.")
    p.add_argument("--concurrency", type=int, default=16, help="Requests in flight.")
    p.add_argument("--event-share", type=float, default=0.5, help="Share of requests that post events.")
    p.add_argument("--batch", type=int, default=1, help="Events per POST.")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--item-ids", default=None, help="Comma-separated item ids (default 1..n_items).")
    p.add_argument("--prefix", default="load-", help="User id prefix.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = p.parse_args(argv)
    random.seed(args.seed)
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['url']} model {report['model_version']}: {report['duration_s']}s, concurrency "
        f"{report['concurrency']}, {report['users']} users, {report['events_per_s']} events/s"
    )
    print(f"{'endpoint':<16}{'requests':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for name, r in report["endpoints"].items():
        print(
            f"{name:<16}{r['requests']:>9}{r['errors']:>8}{r['rps']:>9}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['p99_ms']:>9}"
        )


if __name__ == "__main__":
    main()
