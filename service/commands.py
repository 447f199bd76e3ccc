"""``hytrec serve``, ``hytrec replay`` and ``hytrec backfill``: thin shells over the service's code.

Heavy imports (torch, uvicorn, redis) happen inside the commands so ``hytrec --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

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
    code: int | str | None = 0
    try:
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
    except SystemExit as exc:  # SIGTERM (143), or uvicorn's own exit (a port in use...)
        code = exc.code
    exit_now(code)


def exit_now(code: int | str | None) -> NoReturn:
    """Exit once everything is closed, without the interpreter's teardown.

    Tearing down an interpreter that loaded torch took 0.7-1.5 s of CPU on the 2-core machine even when idle
    (after the last atexit handler, module and heap finalization), several seconds under load: it was most of
    a rolling restart's SIGTERM-to-exit time (docs/reliability.md, "Rolling restart"). The atexit handlers
    still run (log handlers, trace exporters flush); then nothing is left worth finalizing: the connections,
    the embedded Redis and the metrics directory are closed above.
    """
    import atexit
    import sys

    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs before finalizing
    if isinstance(code, str):  # what the interpreter prints for sys.exit("message")
        sys.stderr.write(code + "\n")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


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
    history: Annotated[
        Path | None, typer.Option("--history", help="Interactions file holding the users' full histories.")
    ] = None,
    from_stream: Annotated[
        bool, typer.Option("--from-stream", help="Build from the event log (archive + stream), with stream marks.")
    ] = False,
    archive_dir: Annotated[
        Path | None, typer.Option("--archive", help="With --from-stream: the archive written by `hytrec archive`.")
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint directory (env HYTREC_MODEL).")] = None,
    user: Annotated[list[str] | None, typer.Option("--user", help="Only these users (repeatable).")] = None,
) -> None:
    """Build the states of a model version in batched parallel passes (one pass per user's history).

    --history FILE overwrites that version's states. --from-stream builds from the event log up to its newest
    entries, writing each state's stream mark, and never goes below a mark the dual write already reached
    (docs/lifecycle.md). States of other model versions are never read.
    """
    import asyncio
    import json

    from hytrec.eventlog import read_events
    from hytrec.model.serving import ServingModel
    from hytrec.service.backfill import Backfill, History
    from hytrec.service.settings import Settings
    from hytrec.state_store import open_store

    if (history is None) == (not from_stream):
        typer.echo("error: give exactly one of --history FILE and --from-stream", err=True)
        raise typer.Exit(2)
    _set_env("model", model)
    settings = Settings()
    serving = ServingModel.load(settings.model, settings.state_dtype)
    wanted = set(user or ())

    async def main() -> dict:
        store = await open_store(settings, serving.version)
        job = Backfill(serving, store, asyncio.to_thread)
        try:
            if history is not None:
                from hytrec.streams.erasure import load_tombstones

                users, items, times = read_events(history)
                _, producer = _log_tools()
                try:  # erased users are left out of a history file too (a tombstone at any position)
                    stones = load_tombstones(producer.client, settings.key_prefix)
                finally:
                    producer.close()
                histories: dict[str, History] = {}
                for u, i, t in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
                    if (not wanted or u in wanted) and u not in stones:
                        histories.setdefault(u, History()).items.append(i)
                        histories[u].ts.append(t)
                for h in histories.values():  # by time, ties in file order
                    order = sorted(range(len(h.ts)), key=h.ts.__getitem__)
                    h.items, h.ts = [h.items[k] for k in order], [h.ts[k] for k in order]
                report = await job.overwrite(histories)
            else:
                from hytrec.streams.archive import Archive
                from hytrec.streams.erasure import load_tombstones

                _, producer = _log_tools()
                try:
                    served = _served_now(producer.client, settings, serving.version)
                    if served:
                        typer.echo(
                            f"warning: {serving.version} is served ({', '.join(served)}): a post written to it while "
                            "the backfill runs carries no mark and may be missed or doubled; backfill a version "
                            "before it serves (docs/lifecycle.md)",
                            err=True,
                        )
                    arch = Archive(archive_dir, producer.layout) if archive_dir is not None else None
                    stones = load_tombstones(producer.client, settings.key_prefix)
                    report = await job.from_stream(producer.client, producer.layout, arch, stones)
                finally:
                    producer.close()
                return {**report.as_dict(), "served_by": served}
        finally:
            await store.close()
        return report.as_dict()

    result = asyncio.run(main())
    typer.echo(json.dumps({"model_version": serving.version, **result}))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _served_now(client, settings, version: str) -> list[str]:  # noqa: ANN001 - a synchronous Redis client
    """Who serves ``version`` now: the desired live version or a serving candidate, and every worker that reported
    serving it within 10 poll periods (the writers hash)."""
    import time

    from hytrec.service.swap import Desired, desired_key, writers_key

    desired = Desired.parse(client.hgetall(desired_key(settings.key_prefix)))
    out = []
    if desired.live == version:
        out.append("desired live")
    if desired.candidate == version and (desired.canary > 0 or desired.shadow):
        out.append("desired candidate")
    fresh = (time.time() - 10 * settings.versions_poll_s) * 1000
    for who, raw in sorted(client.hgetall(writers_key(settings.key_prefix)).items()):
        name, parts = _text(who), _text(raw).split(" ")
        alive = len(parts) == 3 and parts[2].isdigit() and int(parts[2]) >= fresh
        if name.startswith("worker-") and alive and parts[0] == version:
            out.append(name)
    return out


def _log_tools():  # noqa: ANN202 - (settings, producer) with the sync client the log tools read through
    from hytrec.service.settings import Settings
    from hytrec.streams import StreamProducer

    s = Settings()
    return s, StreamProducer.from_settings(s)


def archive(
    directory: Annotated[Path, typer.Option("--dir", help="Archive directory (one folder per partition).")],
    older_than_s: Annotated[
        float, typer.Option("--older-than-s", min=0, help="Only archive entries older than this (0: up to the newest).")
    ] = 0.0,
) -> None:
    """Append the stream entries not archived yet to compressed files in the dataset format, then purge the
    entries of users erased since the last run. Idempotent: how far each partition is archived is in its files."""
    import json
    import time

    from hytrec.streams.archive import Archive
    from hytrec.streams.erasure import load_tombstones

    s, producer = _log_tools()
    try:
        upto = None
        if older_than_s:
            cut = int((time.time() - older_than_s) * 1000) - 1
            upto = {p.index: f"{cut}-18446744073709551615" for p in producer.layout.partitions}
        report = Archive(directory, producer.layout).append(
            producer.client, load_tombstones(producer.client, s.key_prefix), upto
        )
    finally:
        producer.close()
    typer.echo(json.dumps(report))


def export(
    out: Annotated[Path, typer.Option("--out", help="Training file to write (user_id item_id timestamp; .gz ok).")],
    archive_dir: Annotated[
        Path | None, typer.Option("--archive", help="Archive directory written by `hytrec archive`.")
    ] = None,
) -> None:
    """Write a training file from the archive plus the stream after it, without the entries of erased users."""
    import json

    from hytrec.streams.archive import Archive, iter_log, write_training_file
    from hytrec.streams.erasure import load_tombstones

    s, producer = _log_tools()
    try:
        arch = Archive(archive_dir, producer.layout) if archive_dir is not None else None
        stones = load_tombstones(producer.client, s.key_prefix)
        n = write_training_file(iter_log(producer.client, producer.layout, arch, stones), out)
    finally:
        producer.close()
    typer.echo(json.dumps({"events": n, "out": str(out), "erased_users": len(stones)}))


def _admin_client(run):  # noqa: ANN001, ANN202 - run(body(client, settings)) over a store's async client
    import asyncio

    from hytrec.service.settings import Settings
    from hytrec.state_store import open_store

    async def main():  # noqa: ANN202
        s = Settings()
        store = await open_store(s, "cli")
        try:
            return await run(store.client, s)
        finally:
            await store.close()

    return asyncio.run(main())


def versions_add(checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (`hytrec train`).")]) -> None:
    """Copy a checkpoint into HYTREC_MODEL_ROOT/<version>, where workers and consumers load it; print the version."""
    from hytrec.model.checkpoint import CheckpointError
    from hytrec.service.settings import Settings
    from hytrec.service.versions import add_version

    s = Settings()
    if s.model_root is None:
        typer.echo("error: set HYTREC_MODEL_ROOT", err=True)
        raise typer.Exit(2)
    try:
        typer.echo(add_version(s.model_root, checkpoint))
    except CheckpointError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def versions_set(
    live: Annotated[str | None, typer.Option("--live", help="Version every worker serves.")] = None,
    candidate: Annotated[str | None, typer.Option("--candidate", help="Canary / shadow version ('' clears).")] = None,
    canary: Annotated[float | None, typer.Option("--canary", min=0.0, max=1.0, help="Share of users.")] = None,
    shadow: Annotated[bool | None, typer.Option("--shadow/--no-shadow", help="Score the candidate alongside.")] = None,
    write: Annotated[
        str | None, typer.Option("--write", help="Comma-separated versions dual-written ('' for none).")
    ] = None,
) -> None:
    """Change the desired versions (kept in Redis, announced): every worker loads, probes and swaps, no restart."""
    import json

    from hytrec.service.swap import set_desired
    from hytrec.service.versions import VersionError, resolve_version

    fields: dict = {}
    if live is not None:
        fields["live"] = live
    if candidate is not None:
        fields["candidate"] = candidate or None
    if canary is not None:
        fields["canary"] = canary
    if shadow is not None:
        fields["shadow"] = shadow
    if write is not None:
        fields["write"] = [v.strip() for v in write.split(",") if v.strip()]

    async def body(client, s):  # noqa: ANN001, ANN202
        for v in [fields.get("live"), fields.get("candidate"), *fields.get("write", [])]:
            if v:
                resolve_version(s, v)
        return await set_desired(client, s.key_prefix, **fields)

    try:
        desired = _admin_client(body)
    except (VersionError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(desired.as_dict()))


def versions_show() -> None:
    """The desired versions, what each worker and consumer reported serving and writing, and the write versions
    that no consumer writes (``unconsumed``: while posts are logged they get posted events from a consumer only)."""
    import json
    import time

    from hytrec.service.swap import read_desired, writers_key
    from hytrec.service.versions import unconsumed_versions

    async def body(client, s):  # noqa: ANN001, ANN202
        desired = await read_desired(client, s.key_prefix)
        raw = await client.hgetall(writers_key(s.key_prefix))
        writers = {k.decode(): v.decode() for k, v in raw.items()}
        now, fresh = time.time() * 1000, 10 * s.versions_poll_s * 1000
        served = {desired.live} if desired.live else set()
        if not served:  # each worker serves what it started with
            for who, value in writers.items():
                parts = value.split(" ")
                alive = len(parts) == 3 and parts[2].isdigit() and int(parts[2]) >= now - fresh
                if who.startswith("worker-") and alive:
                    served.add(parts[0])
        write = [v for v in dict.fromkeys([*s.write_version_list(), *desired.write]) if v not in served]
        unconsumed = unconsumed_versions(writers, write, now, fresh) if s.log_posted_events else []
        return {"desired": desired.as_dict(), "writers": writers, "unconsumed": unconsumed}

    typer.echo(json.dumps(_admin_client(body)))


def versions_drop(version: Annotated[str, typer.Argument(help="The model version whose keys are removed.")]) -> None:
    """Remove a retired version's keys (SCAN in batches) and report what was removed; refuses a version in use."""
    import json
    import time

    from hytrec.service.swap import read_desired, writers_key
    from hytrec.service.versions import drop_version

    async def body(client, s):  # noqa: ANN001, ANN202
        desired = await read_desired(client, s.key_prefix)
        if version in (desired.live, desired.candidate) or version in desired.write:
            return {"refused": f"{version} is the desired live, candidate or a write version"}
        fresh = (time.time() - 10 * s.versions_poll_s) * 1000
        for who, raw in (await client.hgetall(writers_key(s.key_prefix))).items():
            served, written, ms = raw.decode().split(" ")
            if int(ms) >= fresh and version in [served, *written.split(",")]:
                return {"refused": f"{who.decode()} still serves or writes {version}"}
        return {"model_version": version, **(await drop_version(client, s.key_prefix, version))}

    out = _admin_client(body)
    typer.echo(json.dumps(out))
    if "refused" in out:
        raise typer.Exit(1)
