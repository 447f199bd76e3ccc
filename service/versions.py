"""Model versions of a running service: where their checkpoints live, dual write, and the desired versions.

A checkpoint of version V that a service may switch to or dual-write lives in ``HYTREC_MODEL_ROOT/V``
(``hytrec versions add DIR`` copies it there). The desired versions are one Redis hash, announced on a pub/sub
channel; every worker follows it (``VersionWatcher`` in service/swap.py). The runbook is docs/lifecycle.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
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

log = logging.getLogger("hytrec.streams")


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
    batcher.standing, batcher.memory = s.queue_standing_ms / 1000.0, s.queue_memory_intervals  # as the served one's
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


def rest_mirror_versions(settings: Settings, version: str, write: tuple[str, ...]) -> tuple[str, ...]:
    """The versions a worker serving ``version`` writes a post to besides it (its dual-write mirrors).

    None while posted events are logged (HYTREC_LOG_POSTED_EVENTS): the post's log entry, committed with the
    served version's state, reaches every other written version through the consumer, with the entry as the
    mark, so a racing backfill neither misses nor doubles it. Without the log, the write set (unmarked).
    """
    if settings.log_posted_events:
        return ()
    return tuple(v for v in write if v != version)


def unconsumed_versions(writers: dict[Any, Any], versions: Sequence[str], now_ms: float, fresh_ms: float) -> list[str]:
    """Of ``versions``, those that no consumer reported writing within ``fresh_ms`` (the writers hash, values
    ``"<consumed> <written,...> <ms>"``): while posts are logged, only a consumer writes them."""
    covered: set[str] = set()
    for who, raw in writers.items():
        name = who.decode() if isinstance(who, bytes) else str(who)
        parts = (raw.decode() if isinstance(raw, bytes) else str(raw)).split(" ")
        if not name.startswith("consumer-") or len(parts) != 3 or not parts[2].isdigit():
            continue
        if int(parts[2]) >= now_ms - fresh_ms:
            covered.update(parts[1].split(","))
    return [v for v in dict.fromkeys(versions) if v not in covered]


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
    """The versions a ``hytrec consume`` process writes, following the desired versions as serving workers do.

    The consumed version (the consumer's ingestor) is the desired ``live`` version, or the ``--model`` version
    while none is set; the others written are HYTREC_WRITE_VERSIONS and the desired ``write`` versions. The
    ``--model`` version is written only while it is one of these, so after ``hytrec versions set --live V2`` and
    ``--write ''`` a consumer started on V1 writes V2 alone, without a restart. On every announcement
    (pub/sub) and every ``HYTREC_VERSIONS_POLL_S`` it re-reads them, opens the versions it lacks (from
    HYTREC_MODEL_ROOT), points the consumer at the consumed version's ingestor and its list of mirrors (a batch
    uses the ingestor and list it started with; a retried one the new ones, which the marks make idempotent),
    closes the versions no longer written, and reports what it writes in the writers hash.
    """

    def __init__(
        self,
        settings: Settings,
        primary: EventIngestor,
        client: Any,
        run: Runner,
        name: str,
        consumer: Any = None,
        on_switch: Any = None,
    ) -> None:
        self.s = settings
        self.own = primary  # the --model version's ingestor (its store also holds the consumer's connection)
        self.primary = primary  # the ingestor of the version consumed now
        self.client = client
        self.run = run
        self.name = name
        self.consumer = consumer  # whose ``ingestor`` follows ``primary``
        self.on_switch = on_switch  # called with the new primary ingestor (the online evaluation's hook)
        self.mirrors: dict[str, Mirror] = {}
        self._as_mirror = EventIngestor(primary.model, primary.batcher, False, counted=False)
        self._heads: dict[str, EventIngestor] = {primary.model.version: primary}
        self.written: list[str] = [primary.model.version]

    def _head(self, version: str) -> EventIngestor:
        """The counted ingestor of a version consumed (the --model one, or a mirror's model and batcher)."""
        if version not in self._heads:
            m = self.mirrors[version]
            self._heads[version] = EventIngestor(m.model, m.batcher, self.s.strict_items)
        return self._heads[version]

    async def refresh(self) -> None:
        import time

        from hytrec.service.swap import read_desired, writers_key

        desired = await read_desired(self.client, self.s.key_prefix)
        own = self.own.model.version
        live = desired.live or own
        want = list(dict.fromkeys([live, *self.s.write_version_list(), *desired.write]))
        for v in want:
            if v != own and v not in self.mirrors:
                self.mirrors[v] = await open_mirror(self.s, v, self.run)
        head = self._head(live)
        others = [self._as_mirror if v == own else self.mirrors[v].ingestor for v in want if v != live]
        for ing in self._heads.values():
            if ing is not head:
                ing.mirrors = []
        head.mirrors = others
        if head is not self.primary:
            log.info("consumer %s now consumes with %s (was %s)", self.name, live, self.primary.model.version)
            self.primary.batcher.on_applied = None  # the hook follows the consumed version (``on_switch``)
            self.primary = head
            if self.consumer is not None:
                self.consumer.ingestor = head
            if self.on_switch is not None:
                self.on_switch(head)
        for v in [v for v in self.mirrors if v not in want]:
            self._heads.pop(v, None)
            await self.mirrors.pop(v).close()
        self.written = want
        value = f"{live} {','.join(want)} {int(time.time() * 1000)}"
        await self.client.hset(writers_key(self.s.key_prefix), f"consumer-{self.name}", value)

    async def follow(self) -> None:
        """Until cancelled: refresh on every announcement of the desired versions and every poll period. The
        channel is read without blocking every 50 ms (as the serving workers' watcher does); on a cluster
        client, which has no pub/sub here, only the poll runs."""
        import asyncio

        from hytrec.service.swap import announce_channel

        pubsub = None
        with contextlib.suppress(Exception):
            pubsub = self.client.pubsub()
            await pubsub.subscribe(announce_channel(self.s.key_prefix))
        loop = asyncio.get_running_loop()
        due = loop.time() + self.s.versions_poll_s
        try:
            while True:
                announced = False
                if pubsub is not None:
                    try:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
                        announced = msg is not None
                    except Exception:  # noqa: BLE001 - the poll still follows the desired versions
                        pubsub = None
                if announced or loop.time() >= due:
                    try:
                        await self.refresh()
                    except Exception as exc:  # noqa: BLE001 - keep consuming with the versions it has
                        log.warning("write versions not refreshed: %s", exc)
                    due = loop.time() + self.s.versions_poll_s
                await asyncio.sleep(0.05)
        finally:
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        from hytrec.service.swap import writers_key

        for ing in self._heads.values():
            ing.mirrors = []
        if self.consumer is not None:
            self.consumer.ingestor = self.own
        for m in self.mirrors.values():
            await m.close()
        self.mirrors.clear()
        with contextlib.suppress(Exception):  # shutting down; the entry goes stale
            await self.client.hdel(writers_key(self.s.key_prefix), f"consumer-{self.name}")
