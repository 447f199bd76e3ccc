"""Model versions of a running service: where their checkpoints live, dual write, and the desired versions.

A checkpoint of version V that a service may switch to or dual-write lives in ``HYTREC_MODEL_ROOT/V``
(``hytrec versions add DIR`` copies it there). The desired versions are one Redis hash, announced on a pub/sub
channel; every worker follows it (``VersionWatcher`` in service/swap.py). The runbook is docs/lifecycle.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hytrec.model.checkpoint import CONFIG
from hytrec.model.serving import ServingModel
from hytrec.service.events import EventBatcher, EventIngestor
from hytrec.service.paths import ModelPathError, resolve_model_path
from hytrec.service.settings import Settings
from hytrec.state_store import Runner, StateStore, open_store
from hytrec.state_store.keys import KeySpace, check_name


class VersionError(ValueError):
    """A model version that cannot be used: bad name, no checkpoint under the model root, or another version."""


def resolve_version(settings: Settings, version: str) -> Path:
    """The checkpoint directory of ``version``: ``HYTREC_MODEL_ROOT/<version>``, checked to stay inside the root.

    The root check is ``resolve_model_path``'s, the one check of every model path loaded at run time.
    """
    try:
        check_name(version, "model version")
    except ValueError as exc:
        raise VersionError(str(exc)) from None
    if settings.model_root is None:
        raise VersionError("HYTREC_MODEL_ROOT is not set: no checkpoint of another version can be loaded")
    try:
        path = resolve_model_path(version, settings.model_root)
    except ModelPathError as exc:
        raise VersionError(exc.detail) from None
    if path.parent != settings.model_root.resolve() or not (path / CONFIG).is_file():
        raise VersionError(f"no checkpoint of version {version!r} under HYTREC_MODEL_ROOT ({settings.model_root})")
    return path


def load_version(settings: Settings, version: str) -> ServingModel:
    """The serving model of ``version`` (synchronous: run it in the torch thread), checked to be that version."""
    model = ServingModel.load(resolve_version(settings, version), settings.state_dtype)
    if model.version != version:
        raise VersionError(f"{settings.model_root}/{version} holds version {model.version}, not {version}")
    return model


@dataclass
class Mirror:
    """One dual-written version: its model, store, events batcher and (uncounted) ingestor."""

    model: ServingModel
    store: StateStore
    batcher: EventBatcher
    ingestor: EventIngestor

    async def close(self) -> None:
        await self.batcher.stop()
        await self.store.close()


async def open_mirror(settings: Settings, version: str, run: Runner, model: ServingModel | None = None) -> Mirror:
    """Load (unless given) ``version`` and open what writing its states needs."""
    s = settings
    model = model or await run(lambda: load_version(s, version))
    store = await open_store(s, model.version, runner=run)
    batcher = EventBatcher(
        model, store, s.events_batch_max_size, s.events_batch_max_wait_ms, s.max_queue, s.max_queue_delay_ms
    )
    batcher.start()
    return Mirror(model, store, batcher, EventIngestor(model, batcher, False, counted=False))


async def open_mirrors(settings: Settings, serving_version: str, run: Runner) -> list[Mirror]:
    """The mirrors of HYTREC_WRITE_VERSIONS other than ``serving_version``."""
    out: list[Mirror] = []
    try:
        for v in settings.write_version_list():
            if v != serving_version:
                out.append(await open_mirror(settings, v, run))
    except BaseException:
        for m in out:
            await m.close()
        raise
    return out


def add_version(root: Path, checkpoint: Path) -> str:
    """Copy a checkpoint directory to ``root/<its version>`` (validated first); returns the version."""
    import shutil

    from hytrec.model.checkpoint import validate_checkpoint

    validate_checkpoint(checkpoint)
    version = ServingModel.load(checkpoint).version
    dest = root / version
    if not (dest / CONFIG).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp)
        tmp.rename(dest)
    return version


async def drop_version(client: Any, prefix: str, version: str, batch: int = 500) -> dict[str, int]:
    """Remove every key of ``version`` (``<prefix>:<version>:{u:*``), found with SCAN and unlinked in pipelined
    batches, and take the version out of each user's version set. The caller refuses a version in use."""
    check_name(version, "model version")
    space = KeySpace(prefix, version)
    removed = states = 0
    keys: list[Any] = []

    async def flush() -> None:
        nonlocal removed, states
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.unlink(key)
            user = space.user_of(key)
            if user is not None:
                pipe.srem(space.versions(user), version)
        results = await pipe.execute()
        k = 0
        for key in keys:
            removed += int(results[k])
            k += 1
            if space.user_of(key) is not None:
                states += 1
                k += 1
        keys.clear()

    async for key in client.scan_iter(match=f"{prefix}:{version}:{{u:*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            await flush()
    if keys:
        await flush()
    return {"keys_removed": removed, "users": states}


class MirrorSet:
    """The dual-written versions of a ``hytrec consume`` process, following the desired ``write`` versions.

    Every ``HYTREC_VERSIONS_POLL_S`` it re-reads them (with HYTREC_WRITE_VERSIONS and the desired live version,
    which is always written), opens the mirrors it lacks,
    closes those no longer wanted, updates the ingestor's list in place (a batch uses the list it started
    with) and reports what this process writes in the writers hash, as the service's workers do.
    """

    def __init__(self, settings: Settings, primary: EventIngestor, client: Any, run: Runner, name: str) -> None:
        self.s = settings
        self.primary = primary
        self.client = client
        self.run = run
        self.name = name
        self.mirrors: dict[str, Mirror] = {}

    async def refresh(self) -> None:
        import time

        from hytrec.service.swap import read_desired, writers_key

        desired = await read_desired(self.client, self.s.key_prefix)
        version = self.primary.model.version
        wanted = [*self.s.write_version_list(), *desired.write, *([desired.live] if desired.live else [])]
        want = [v for v in dict.fromkeys(wanted) if v != version]  # the live version is always written
        for v in want:
            if v not in self.mirrors:
                self.mirrors[v] = await open_mirror(self.s, v, self.run)
        gone = [v for v in self.mirrors if v not in want]
        self.primary.mirrors = [self.mirrors[v].ingestor for v in want]
        for v in gone:
            await self.mirrors.pop(v).close()
        written = ",".join([version, *want])
        value = f"{version} {written} {int(time.time() * 1000)}"
        await self.client.hset(writers_key(self.s.key_prefix), f"consumer-{self.name}", value)

    async def follow(self) -> None:
        import asyncio
        import logging

        while True:
            await asyncio.sleep(self.s.versions_poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep consuming with the mirrors it has
                logging.getLogger("hytrec.streams").warning("write versions not refreshed: %s", exc)

    async def close(self) -> None:
        from hytrec.service.swap import writers_key

        self.primary.mirrors = []
        for m in self.mirrors.values():
            await m.close()
        self.mirrors.clear()
        with contextlib.suppress(Exception):  # shutting down; the entry goes stale
            await self.client.hdel(writers_key(self.s.key_prefix), f"consumer-{self.name}")
