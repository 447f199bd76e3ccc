"""Admin routes of the model lifecycle (admin scope, ``/v1/admin``; 404 while no admin key is set).

``PUT /v1/admin/model`` changes the desired versions that every worker follows (service/swap.py), as
``hytrec versions set`` does; ``GET /v1/admin/model`` shows them with what this worker serves and which
processes write which versions. The runbook is docs/lifecycle.md.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from hytrec.service.errors import field_problem
from hytrec.service.routes import Ready, lifecycle
from hytrec.service.runtime import Lifecycle
from hytrec.service.swap import read_desired, set_desired, writers_key
from hytrec.service.versions import VersionError, resolve_version

VERSION = r"^[A-Za-z0-9_.-]{1,128}$"
_bearer = HTTPBearer(auto_error=False, description="An admin key (HYTREC_ADMIN_KEYS).")
router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(_bearer)])


class DesiredChange(BaseModel):
    """Fields left out are kept; ``candidate: null`` removes the candidate."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(None, pattern=VERSION, description="The version every worker serves (live).")
    candidate: str | None = Field(None, pattern=VERSION, description="Canary / shadow version (null: none).")
    canary: float | None = Field(None, ge=0.0, le=1.0, description="Share of users the candidate serves.")
    shadow: bool | None = Field(None, description="Score the candidate alongside the live version, logged.")
    write: list[Annotated[str, Field(pattern=VERSION)]] | None = Field(
        None, max_length=16, description="Versions dual-written besides HYTREC_WRITE_VERSIONS."
    )


class VersionsStatus(BaseModel):
    desired: dict[str, Any]
    worker: dict[str, Any]
    writers: dict[str, str]


def _status(lc: Lifecycle, desired: dict[str, Any], writers: dict[str, str]) -> VersionsStatus:
    import os

    rt = lc.runtime
    w = lc.watcher
    worker = {
        "pid": os.getpid(),
        "version": rt.model.version if rt else None,
        "candidate": rt.candidate.model.version if rt and rt.candidate else None,
        "canary": rt.canary if rt else 0.0,
        "shadow": rt.shadow if rt else False,
        "writes": [rt.model.version, *(m.model.version for m in rt.mirrors)] if rt else [],
        "applied_rev": w.applied_rev if w else None,
        "swaps": w.swaps if w else 0,
        "swap_error": w.error if w else None,
    }
    return VersionsStatus(desired=desired, worker=worker, writers=writers)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@router.get("/model", response_model=VersionsStatus, operation_id="get_versions", summary="Desired model versions")
async def get_versions(rt: Ready, lc: Annotated[Lifecycle, Depends(lifecycle)]) -> VersionsStatus:
    prefix = rt.settings.key_prefix
    desired = await read_desired(rt.store.client, prefix)
    writers = {_text(k): _text(v) for k, v in (await rt.store.client.hgetall(writers_key(prefix))).items()}
    return _status(lc, desired.as_dict(), writers)


@router.put("/model", response_model=VersionsStatus, operation_id="set_versions", summary="Set the desired versions")
async def put_versions(
    change: DesiredChange, rt: Ready, lc: Annotated[Lifecycle, Depends(lifecycle)]
) -> VersionsStatus:
    """Every worker loads, probes and swaps in the background (watch ``worker.swaps`` and ``/readyz``)."""
    s = rt.settings
    errors = []
    named = [("version", change.version), ("candidate", change.candidate)]
    named += [(f"write[{i}]", v) for i, v in enumerate(change.write or [])]
    for where, v in named:
        if v is None or v == lc.started_version:
            continue
        try:
            resolve_version(s, v)
        except VersionError as exc:
            errors.append({"field": where, "in": "body", "message": str(exc), "type": "unknown_version"})
    if errors:
        raise field_problem(errors, "a named version has no checkpoint under HYTREC_MODEL_ROOT; nothing changed")
    fields: dict[str, Any] = {}
    if change.version is not None:
        fields["live"] = change.version
    if "candidate" in change.model_fields_set:
        fields["candidate"] = change.candidate
    for name in ("canary", "shadow", "write"):
        value = getattr(change, name)
        if value is not None:
            fields[name] = value
    desired = await set_desired(rt.store.client, s.key_prefix, **fields)
    return _status(lc, desired.as_dict(), {})
