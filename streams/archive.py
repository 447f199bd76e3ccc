"""The event log past the stream's retention: an archive of compressed files in the dataset format, and export.

``hytrec archive --dir DIR`` appends, per partition, the stream entries after the last one archived to a new
file ``DIR/p<partition>/<first entry>_<last entry>.tsv.gz``: tab-separated ``user_id item_id timestamp
entry_id event_id`` with a header, which ``hytrec.eventlog.read_events`` (and so training) reads as a dataset
(the extra columns are ignored). A file appears by an atomic rename, and how far a partition is archived is
the highest last entry in its file names, so a run that crashed or is repeated never archives an entry twice
or skips one. ``DIR/archive.json`` names the stream and records up to which erasure the files were purged.

**Erasure.** Entries covered by a tombstone are never archived. When tombstones newer than the last purge
exist, the run also rewrites every file holding entries they cover (docs/lifecycle.md states the retention).

``iter_log`` reads the whole log, archive then the stream after it, per partition in entry order, without the
erased entries: what ``hytrec export`` writes as a training file (``write_training_file``) and
``hytrec backfill --from-stream`` builds states from.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import exceptions as rex

from hytrec.state_store import entry_key
from hytrec.streams import wire
from hytrec.streams.erasure import Tombstone, erased
from hytrec.streams.partition import Partition, StreamLayout

COLUMNS = ("user_id", "item_id", "timestamp", "entry_id", "event_id")
MANIFEST = "archive.json"
PAGE = 10_000
_FILE = re.compile(r"^(\d+-\d+)_(\d+-\d+)\.tsv\.gz$")


class ArchiveError(ValueError):
    """An archive directory that belongs to another stream, or holds a malformed file."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One applied-or-to-apply event of the log, with its stream position."""

    partition: int
    entry_id: str
    user_id: str
    item_id: str
    ts: float
    event_id: str | None = None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_entries(
    client: Any, part: Partition, after: str = "0-0", upto: str | None = None, page: int = PAGE
) -> Iterator[LogEntry]:
    """The valid entries of one partition in ``(after, upto]`` (sync client, XRANGE in pages); entries that do
    not decode are left out, as the consumer dead-letters them."""
    lo = "-" if after == "0-0" else f"({after}"
    hi = upto or "+"
    while True:
        rows = client.xrange(part.stream, min=lo, max=hi, count=page)
        for eid, fields in rows:
            eid = _s(eid)
            try:
                e = wire.decode(fields)
            except wire.BadEntry:
                continue
            yield LogEntry(part.index, eid, e.user_id, e.item_id, float(e.ts), e.event_id)
        if len(rows) < page:
            return
        lo = f"({_s(rows[-1][0])}"


def stream_heads(client: Any, layout: StreamLayout) -> dict[int, str]:
    """Per partition, the last entry id generated (``0-0`` for a partition never written)."""
    out = {}
    for part in layout.partitions:
        try:
            info = client.xinfo_stream(part.stream)
            out[part.index] = _s(info.get("last-generated-id") or "0-0")
        except rex.ResponseError:
            out[part.index] = "0-0"
    return out


class Archive:
    """One archive directory of one stream; see the module docstring."""

    def __init__(self, directory: str | Path, layout: StreamLayout) -> None:
        self.dir = Path(directory)
        self.layout = layout
        self.manifest = self._manifest()

    def _manifest(self) -> dict[str, Any]:
        path = self.dir / MANIFEST
        want = {"prefix": self.layout.prefix, "stream": self.layout.name, "partitions": self.layout.n}
        if not path.is_file():
            return {**want, "purged_ms": 0}
        data = json.loads(path.read_text())
        if {k: data.get(k) for k in want} != want:
            raise ArchiveError(f"{self.dir} archives {data} and not {want}")
        return data

    def _save_manifest(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    def files(self, partition: int) -> list[tuple[str, str, Path]]:
        """The partition's files as (first entry, last entry, path), in entry order."""
        d = self.dir / f"p{partition:04d}"
        out = []
        for path in d.glob("*.tsv.gz") if d.is_dir() else ():
            m = _FILE.match(path.name)
            if m is None:
                raise ArchiveError(f"{path}: not an archive file name <first>_<last>.tsv.gz")
            out.append((m.group(1), m.group(2), path))
        return sorted(out, key=lambda f: entry_key(f[0]))

    def position(self, partition: int) -> str:
        """The last entry archived of the partition (``0-0``: none)."""
        files = self.files(partition)
        return max((f[1] for f in files), key=entry_key) if files else "0-0"

    def entries(self, partition: int) -> Iterator[LogEntry]:
        """The archived entries of one partition, in entry order."""
        for _, _, path in self.files(partition):
            yield from _read_file(path, partition)

    def append(
        self, client: Any, tombstones: Mapping[str, Tombstone], upto: Mapping[int, str] | None = None
    ) -> dict[str, Any]:
        """Archive each partition's entries after its position (up to ``upto[p]``, default the newest), then
        purge the files of users erased since the last purge. Returns what it did, per partition."""
        heads = stream_heads(client, self.layout)
        report: dict[str, Any] = {"partitions": {}}
        for part in self.layout.partitions:
            p = part.index
            after = self.position(p)
            hi = (upto or {}).get(p) or heads[p]
            rows, skipped, last = [], 0, after
            for e in stream_entries(client, part, after, hi):
                last = e.entry_id
                if erased(tombstones, e.user_id, e.entry_id):
                    skipped += 1
                    continue
                rows.append(e)
            gap = _gap(client, part, after)
            if entry_key(last) > entry_key(after):
                first = rows[0].entry_id if rows else last
                _write_file(self.dir / f"p{p:04d}" / f"{first}_{last}.tsv.gz", rows)
            report["partitions"][str(p)] = {
                "archived": len(rows),
                "erased": skipped,
                "from": after,
                "to": last,
                "gap": gap,
            }
        report["purge"] = self.purge(tombstones)
        return report

    def purge(self, tombstones: Mapping[str, Tombstone]) -> dict[str, int]:
        """Rewrite the files holding entries of users erased after the last purge; idempotent."""
        newer = {u: t for u, t in tombstones.items() if t.deleted_ms > int(self.manifest.get("purged_ms", 0))}
        removed = rewritten = 0
        if newer:
            for part in self.layout.partitions:
                for _, _, path in self.files(part.index):
                    rows = list(_read_file(path, part.index))
                    kept = [e for e in rows if not erased(newer, e.user_id, e.entry_id)]
                    if len(kept) != len(rows):
                        _write_file(path, kept)
                        removed += len(rows) - len(kept)
                        rewritten += 1
            self.manifest["purged_ms"] = max(t.deleted_ms for t in newer.values())
        self._save_manifest()
        return {"erasures": len(newer), "entries_removed": removed, "files_rewritten": rewritten}


def iter_log(
    client: Any,
    layout: StreamLayout,
    archive: Archive | None,
    tombstones: Mapping[str, Tombstone],
    upto: Mapping[int, str] | None = None,
) -> Iterator[LogEntry]:
    """Every entry of the log that is not erased: per partition, the archive then the stream after it, up to
    ``upto[p]`` (default: the newest entry). Entries of one user come in stream order."""
    for part in layout.partitions:
        hi = (upto or {}).get(part.index)
        after = "0-0"
        if archive is not None:
            for e in archive.entries(part.index):
                if hi is not None and entry_key(e.entry_id) > entry_key(hi):
                    break
                after = e.entry_id
                if not erased(tombstones, e.user_id, e.entry_id):
                    yield e
            after = max(after, archive.position(part.index), key=entry_key)
        for e in stream_entries(client, part, after, hi):
            if not erased(tombstones, e.user_id, e.entry_id):
                yield e


def write_training_file(entries: Iterator[LogEntry], out: str | Path) -> int:
    """Write ``entries`` as a training file (``user_id item_id timestamp``, gzip when ``out`` ends in .gz)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    n = 0
    opener = gzip.open if out.name.endswith(".gz") else open
    try:
        with opener(tmp, "wt", encoding="utf-8") as f:
            f.write("user_id\titem_id\ttimestamp\n")
            for e in entries:
                f.write(f"{e.user_id}\t{e.item_id}\t{e.ts!r}\n")
                n += 1
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def _gap(client: Any, part: Partition, after: str) -> bool | None:
    """Whether entries after ``after`` were trimmed before they were archived (None: Redis < 7 cannot tell)."""
    try:
        info = client.xinfo_stream(part.stream)
    except rex.ResponseError:
        return False
    deleted = info.get("max-deleted-entry-id")
    if deleted is None:
        return None
    return entry_key(_s(deleted)) > entry_key(after)


def _read_file(path: Path, partition: int) -> Iterator[LogEntry]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if tuple(header) != COLUMNS:
            raise ArchiveError(f"{path}: header {header} is not {list(COLUMNS)}")
        for line in f:
            user, item, ts, entry, event = line.rstrip("\n").split("\t")
            yield LogEntry(partition, entry, user, item, float(ts), event or None)


def _write_file(path: Path, rows: list[LogEntry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(COLUMNS)]
    lines += [f"{e.user_id}\t{e.item_id}\t{e.ts!r}\t{e.entry_id}\t{e.event_id or ''}" for e in rows]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


__all__ = ["Archive", "ArchiveError", "LogEntry", "iter_log", "write_training_file", "stream_entries", "stream_heads"]
