"""Model versions of a running service: where their checkpoints live, dual write, and the desired versions.

A checkpoint of version V that a service may switch to or dual-write lives in ``HYTREC_MODEL_ROOT/V``
(``hytrec versions add DIR`` copies it there). The desired versions are one Redis hash, announced on a pub/sub
channel; every worker follows it (``VersionWatcher`` in service/swap.py). The runbook is docs/lifecycle.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hytrec.model.checkpoint import CONFIG
from hytrec.model.serving import ServingModel
from hytrec.service.events import EventBatcher, EventIngestor
from hytrec.service.settings import Settings
from hytrec.state_store import Runner, StateStore, open_store
from hytrec.state_store.keys import check_name


class VersionError(ValueError):
    """A model version that cannot be used: bad name, no checkpoint under the model root, or another version."""


def resolve_version(settings: Settings, version: str) -> Path:
    """The checkpoint directory of ``version``: ``HYTREC_MODEL_ROOT/<version>``, checked to stay inside the root.

    (A local check of the model root; the admin reload's ``resolve_model_path`` does the same for paths.)
    """
    try:
        check_name(version, "model version")
    except ValueError as exc:
        raise VersionError(str(exc)) from None
    if settings.model_root is None:
        raise VersionError("HYTREC_MODEL_ROOT is not set: no checkpoint of another version can be loaded")
    root = settings.model_root.resolve()
    path = (root / version).resolve()
    if path.parent != root or not (path / CONFIG).is_file():
        raise VersionError(f"no checkpoint of version {version!r} under HYTREC_MODEL_ROOT ({root})")
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
