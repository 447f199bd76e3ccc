"""``hytrec impressions``: export the impression log, and compare model versions offline with an interval.

**Export** (``hytrec impressions export``) reads the export stream (``<prefix>:impressions``) oldest first
and writes JSON Lines, one impression a line::

    {"entry": "1700000000000-0", "user_id": "u1", "ts": 1700000000.0, "model_version": "3f2a...",
     "source": "model", "items": ["12", "7", ...]}

``entry`` is the stream id of the background write that carried it (``--since`` resumes after one), ``ts``
the request time (unix seconds), ``items`` the ids served, best first (``source`` ``shadow``: scored, never
shown to the user, so not an exposure).

**Compare** (``hytrec impressions compare``) attributes an event log (the dataset TSV, ``hytrec.eventlog``)
to an exported log with the service's own rule (``online_eval.attribute``: each event to the user's latest
served impression at or before it, within the window, and to the shadow impression of that same request too),
then per (model version, source) arm computes HR@k with a Wilson score interval, MRR@k, and against the
baseline arm the difference of HR@k with Newcombe's hybrid score interval (method 10 of Newcombe 1998, built
from the two Wilson intervals). **The rule**: a candidate is better when the interval's lower bound is above
0, worse when its upper bound is below 0, otherwise the sample cannot tell, and the interval's half-width is the
smallest difference this sample could have shown.
It treats events as independent; several events per user make the true interval wider (docs/online_eval.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any, TextIO

import typer

from hytrec.service.online_eval import Impression, attribute, beside, log_key

# ----------------------------------------------------------------------------------------- statistics


def wilson(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``hits / n`` ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(hits_b: int, n_b: int, hits_a: int, n_a: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of ``p_b - p_a`` (Newcombe's hybrid score interval from the two Wilson intervals)."""
    pa, pb = (hits_a / n_a if n_a else 0.0), (hits_b / n_b if n_b else 0.0)
    la, ua = wilson(hits_a, n_a, confidence)
    lb, ub = wilson(hits_b, n_b, confidence)
    d = pb - pa
    return d - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2), d + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)


@dataclass
class Arm:
    """One (model version, source): attributed events, hits within the top k, reciprocal-rank sum."""

    version: str
    source: str
    attributed: int = 0
    hits: int = 0
    rr: float = 0.0
    users: int = 0

    @property
    def name(self) -> str:
        return f"{self.version}:{self.source}"

    @property
    def hr(self) -> float:
        return self.hits / self.attributed if self.attributed else math.nan

    @property
    def mrr(self) -> float:
        return self.rr / self.attributed if self.attributed else math.nan


@dataclass
class Verdict:
    candidate: str
    baseline: str
    difference: float  # HR@k of the candidate minus the baseline's
    low: float
    high: float
    decision: str  # "better", "worse" or "undecided"


def decide(candidate: Arm, baseline: Arm, confidence: float = 0.95) -> Verdict:
    """The documented rule: better when the whole interval of the HR@k difference is above 0 (see module)."""
    low, high = newcombe(candidate.hits, candidate.attributed, baseline.hits, baseline.attributed, confidence)
    decision = "better" if low > 0 else "worse" if high < 0 else "undecided"
    return Verdict(candidate.name, baseline.name, candidate.hr - baseline.hr, low, high, decision)


# ---------------------------------------------------------------------------------- offline attribution


@dataclass
class Attributed:
    """What an event log did after an exported impression log (the service's rule, offline)."""

    arms: dict[tuple[str, str], Arm]
    no_impression: int


def attribute_log(
    impressions: Iterable[Impression],
    events: Iterable[tuple[str, str, float]],
    window_s: float,
    k: int = 10,
) -> Attributed:
    """Attribute each (user, item, ts) event to the user's latest served impression at or before ``ts``, and to
    the shadow impression of that same request if there is one (``online_eval.beside``), as the service does."""
    by_user: dict[str, list[Impression]] = defaultdict(list)
    shadows: dict[tuple[str, float], Impression] = {}
    for imp in impressions:
        if imp.source == "shadow":
            shadows[imp.user_id, imp.ts] = imp
        else:
            by_user[imp.user_id].append(imp)
    for imps in by_user.values():
        imps.sort(key=lambda i: i.ts)
    arms: dict[tuple[str, str], Arm] = {}
    seen_users: dict[tuple[str, str], set[str]] = defaultdict(set)
    cursor: dict[str, int] = defaultdict(int)
    none = 0
    for user, item, ts in sorted(events, key=lambda e: e[2]):
        imps = by_user.get(user, [])
        i = cursor[user]
        while i < len(imps) and imps[i].ts <= ts:
            i += 1
        cursor[user] = i
        served = imps[i - 1] if i else None
        rank = attribute(served, item, ts, window_s)
        if served is None or rank is None:
            none += 1
            continue
        shadow = beside(shadows.get((user, served.ts)), served)
        for imp in (served, shadow):
            rank = attribute(imp, item, ts, window_s)
            if imp is None or rank is None:
                continue
            key = (imp.model_version, imp.source)
            arm = arms.setdefault(key, Arm(*key))
            arm.attributed += 1
            seen_users[key].add(user)
            if 0 < rank <= k:
                arm.hits += 1
                arm.rr += 1.0 / rank
    for key, arm in arms.items():
        arm.users = len(seen_users[key])
    return Attributed(arms, none)


# --------------------------------------------------------------------------------------------- export


def entry_lines(entry_id: str, fields: dict[Any, Any]) -> Iterator[dict[str, Any]]:
    raw = fields.get(b"i", fields.get("i", b""))
    text = raw.decode() if isinstance(raw, bytes) else raw
    for line in text.split("\n"):
        if line:
            yield {"entry": entry_id, **Impression.parse_line(line).to_json()}


async def export_stream(client: Any, prefix: str, out: TextIO, since: str | None = None, chunk: int = 500) -> int:
    """Write every impression of the export stream after entry ``since`` (oldest first) as JSON Lines."""
    start = f"({since}" if since else "-"
    n = 0
    while True:
        entries = await client.xrange(log_key(prefix), min=start, max="+", count=chunk)
        if not entries:
            return n
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            for record in entry_lines(eid, fields):
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
                n += 1
        start = f"({eid}"


def read_jsonl(path: Path) -> list[Impression]:
    """Impressions of an exported file."""
    out = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append(Impression(r["user_id"], float(r["ts"]), r["model_version"], r["source"], tuple(r["items"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise typer.BadParameter(f"{path}:{n}: not an exported impression ({exc})") from exc
    return out


# ------------------------------------------------------------------------------------------- commands


def export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL file (default: stdout).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only entries after this stream id.")] = None,
) -> None:
    """Write the impression log of the configured Redis (HYTREC_REDIS_URL, HYTREC_KEY_PREFIX) as JSON Lines."""
    from hytrec.service.settings import Settings
    from hytrec.state_store import open_store

    settings = Settings()

    async def go(out: TextIO) -> int:
        store = await open_store(settings)
        try:
            return await export_stream(store.client, settings.key_prefix, out, since)
        finally:
            await store.close()

    if output is None:
        n = asyncio.run(go(sys.stdout))
    else:
        with output.open("w") as fh:
            n = asyncio.run(go(fh))
    typer.echo(f"{n} impressions exported", err=True)


def compare(
    impressions: Annotated[Path, typer.Argument(help="Exported impressions (JSONL).")],
    events: Annotated[Path, typer.Argument(help="Event log (user_id, item_id, timestamp TSV, plain or gzip).")],
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="VERSION:SOURCE of the baseline (default: most events).")
    ] = None,
    window_s: Annotated[
        float | None, typer.Option("--window-s", help="Attribution window (default: HYTREC_ATTRIBUTION_WINDOW_S).")
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="HR@k and MRR@k.")] = 10,
    confidence: Annotated[float, typer.Option("--confidence", min=0.5, max=0.999, help="Interval level.")] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """HR@k and MRR@k per model version and source, and each arm against the baseline with the decision rule."""
    from hytrec.eventlog import DataFormatError, read_events
    from hytrec.service.settings import Settings

    window = Settings().attribution_window_s if window_s is None else window_s
    try:
        users, items, stamps = read_events(events)
    except DataFormatError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = attribute_log(
        read_jsonl(impressions), zip(users.tolist(), items.tolist(), stamps.tolist(), strict=True), window, k
    )
    arms = sorted(result.arms.values(), key=lambda a: -a.attributed)
    if not arms:
        raise typer.BadParameter("no event follows an impression within the window")
    names = {a.name: a for a in arms}
    if baseline is not None and baseline not in names:
        raise typer.BadParameter(f"no arm {baseline!r}; arms: {', '.join(names)}")
    base = names[baseline] if baseline else arms[0]
    verdicts = [decide(a, base, confidence) for a in arms if a is not base]
    report = {
        "k": k,
        "window_s": window,
        "confidence": confidence,
        "no_impression": result.no_impression,
        "arms": [
            {**asdict(a), "hr": a.hr, "mrr": a.mrr, "hr_interval": wilson(a.hits, a.attributed, confidence)}
            for a in arms
        ],
        "comparisons": [asdict(v) for v in verdicts],
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{'arm':<40} {'events':>8} {'users':>6} {'HR@' + str(k):>8} {'interval':>17} {'MRR@' + str(k):>8}")
    for a, row in zip(arms, report["arms"], strict=True):
        lo, hi = row["hr_interval"]
        typer.echo(f"{a.name:<40} {a.attributed:>8} {a.users:>6} {a.hr:>8.4f} [{lo:.4f}, {hi:.4f}] {a.mrr:>8.4f}")
    typer.echo(f"events without a preceding impression: {result.no_impression}")
    for v in verdicts:
        typer.echo(
            f"{v.candidate} vs {v.baseline}: HR@{k} {v.difference:+.4f}, {confidence:.0%} interval "
            f"[{v.low:+.4f}, {v.high:+.4f}] -> {v.decision}"
        )
