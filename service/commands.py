"""``hytrec serve``, ``hytrec replay`` and ``hytrec backfill``: thin shells over the service's code.

Heavy imports (torch, uvicorn, redis) happen inside the commands so ``hytrec --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def _set_env(name: str, value: object | None) -> None:
    """Pass a CLI option to the workers as the environment variable the settings read."""
    if value is not None:
        os.environ[f"HYTREC_{name.upper()}"] = str(value)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Interface to bind (env HYTREC_HOST).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to bind (env HYTREC_PORT).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes (env HYTREC_WORKERS).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint directory (env HYTREC_MODEL).")] = None,
) -> None:
    """Run the inference service. Without HYTREC_REDIS_URL it starts an embedded Redis under HYTREC_DATA_DIR."""
    import shutil
    import signal
    import tempfile

    import uvicorn

    from hytrec.model.checkpoint import CONFIG, CheckpointError, validate_checkpoint
    from hytrec.service.logs import log_config
    from hytrec.service.settings import Settings

    for name, value in (("host", host), ("port", port), ("workers", workers), ("model", model)):
        _set_env(name, value)
    settings = Settings()
    if not (settings.model / CONFIG).is_file():
        typer.echo(
            f"error: no checkpoint at {settings.model} (set HYTREC_MODEL or --model to a directory written by "
            "`hytrec train`)",
            err=True,
        )
        raise typer.Exit(2)
    try:  # a broken checkpoint is a startup error with the file's name, not a traceback in every worker
        validate_checkpoint(settings.model)
    except CheckpointError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    embedded = None
    if settings.redis_url is None:
        from hytrec.state_store.embedded import EmbeddedRedis

        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        embedded = EmbeddedRedis(settings.data_dir, settings.redis_username, password)  # workers AUTH with these
        os.environ["HYTREC_REDIS_URL"] = f"unix://{embedded.start()}"  # shared by every worker
        typer.echo(f"embedded redis: data in {embedded.data_dir}", err=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception so the finally below runs
    signal.signal(signal.SIGTERM, _raise_exit)
    prom_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        prom_dir = tempfile.mkdtemp(prefix="hytrec-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    try:
        uvicorn.run(
            "hytrec.service.app:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
            log_config=log_config(settings),
            access_log=settings.access_log,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    finally:
        if embedded is not None:
            embedded.stop()
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)


def replay(
    log: Annotated[
        Path, typer.Option("--log", help="Interactions file: user_id item_id timestamp (TSV, header, .gz ok).")
    ],
    url: Annotated[str, typer.Option("--url", envvar="HYTREC_URL", help="Service base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="HYTREC_API_KEY", help="Bearer key.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Events per POST.")] = 500,
    event_ids: Annotated[
        bool,
        typer.Option("--event-ids/--no-event-ids", help="Ids from file and line: a re-sent batch is applied once."),
    ] = True,
) -> None:
    """Post a log into a running server in time order (per user, ties in file order), batch by batch."""
    import hashlib
    import json
    import time

    import numpy as np

    from hytrec.eventlog import read_events
    from hytrec.service.client import HyTRecClient

    users, items, times = read_events(log)
    order = np.argsort(times, kind="stable")
    tag = hashlib.sha1(f"{log.resolve()}:{log.stat().st_size}".encode()).hexdigest()[:8]
    totals = {"applied": 0, "duplicates": 0, "unknown_items": 0, "out_of_order": 0, "batches": 0}
    start = time.perf_counter()
    with HyTRecClient(url, api_key=api_key, timeout=30.0) as client:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size].tolist()
            batch = [
                {
                    "user_id": str(users[i]),
                    "item_id": str(items[i]),
                    "ts": float(times[i]),
                    **({"event_id": f"r{tag}-{i}"} if event_ids else {}),
                }
                for i in idx
            ]
            res = client.post_events(batch)
            for key in ("applied", "duplicates", "unknown_items", "out_of_order"):
                totals[key] += getattr(res, key)
            totals["batches"] += 1
    totals["events"] = len(order)
    totals["seconds"] = round(time.perf_counter() - start, 3)
    typer.echo(json.dumps(totals))


def backfill(
    history: Annotated[Path, typer.Option("--history", help="Interactions file holding the users' full histories.")],
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint directory (env HYTREC_MODEL).")] = None,
    user: Annotated[list[str] | None, typer.Option("--user", help="Only these users (repeatable).")] = None,
) -> None:
    """Rebuild the states of a model version from a history file (parallel form), overwriting that version's.

    States of other model versions are never read: they live under other keys and expire or are dropped.
    """
    import asyncio
    import json
    import time

    import numpy as np

    from hytrec.eventlog import read_events
    from hytrec.model.serving import ServingModel
    from hytrec.service.settings import Settings
    from hytrec.state_store import open_store

    _set_env("model", model)
    settings = Settings()
    serving = ServingModel.load(settings.model, settings.state_dtype)
    users, items, times = read_events(history)
    order = np.lexsort((np.arange(len(times)), times, users))  # by user, then time, ties in file order
    users, items, times = users[order], items[order], times[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = list(zip(starts.tolist(), [*starts[1:].tolist(), len(users)], strict=True))
    wanted = set(user or ())

    async def main() -> dict[str, float]:
        store = await open_store(settings, serving.version)
        done = events = 0
        start = time.perf_counter()
        try:
            for lo, hi in bounds:
                uid = str(users[lo])
                if wanted and uid not in wanted:
                    continue
                rows = [serving.row(str(i)) for i in items[lo:hi]]
                stamps = times[lo:hi].tolist()
                blob = serving.encode(serving.build(rows, stamps))
                await store.put(uid, blob, n_events=len(rows), last_ts=max(stamps))  # replaces count and ts
                done += 1
                events += len(rows)
        finally:
            await store.close()
        return {"users": done, "events": events, "seconds": round(time.perf_counter() - start, 3)}

    result = asyncio.run(main())
    typer.echo(json.dumps({"model_version": serving.version, **result}))
