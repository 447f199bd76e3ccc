"""``hytrec loadtest`` (also ``python -m hytrec.loadtest``): open-loop load against a server, or calibration.

Imports of the generator (hdrhistogram, uvloop) happen inside the command so ``hytrec --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

CALIBRATION_RATES = "100,200,400,800,1600,3200,6400,12800"


def _opt(*names: str, **kw: Any) -> Any:
    return typer.Option(*names, **kw)


def calibration_ceiling(runs: list[dict[str, Any]], p99_ms: float) -> tuple[float | None, list[dict[str, Any]]]:
    """The highest rate, below the first one that fails, at which the generator kept up with p99 <= ``p99_ms``."""
    verdicts, ceiling, failed = [], None, False
    for run in sorted(runs, key=lambda r: r["offered_rps"]):
        e = run["endpoints"]["hello"]
        p99 = e["latency_ms"]["p99"]
        ok = bool(run["keeps_up"] and p99 is not None and p99 <= p99_ms)
        verdicts.append({"offered_rps": run["offered_rps"], "answer_rps": e["answer_rps"], "p99_ms": p99, "pass": ok})
        failed = failed or not ok
        if ok and not failed:
            ceiling = run["offered_rps"]
    return ceiling, verdicts


def loadtest(
    url: Annotated[str, _opt("--url", envvar="HYTREC_URL", help="Server base URL (http only).")] = (
        "http://127.0.0.1:8000"
    ),
    rate: Annotated[float, _opt("--rate", help="Offered load, req/s (Poisson arrivals).")] = 50.0,
    sweep: Annotated[str | None, _opt("--sweep", help="Several rates in turn, e.g. 25,50,100 (overrides --rate).")] = (
        None
    ),
    duration: Annotated[float, _opt("--duration", help="Measured seconds per rate.")] = 10.0,
    warmup: Annotated[float, _opt("--warmup", help="Seconds sent first at each rate, not counted.")] = 2.0,
    mix: Annotated[str, _opt("--mix", help="Endpoint shares: recommend, events (and hello: GET /).")] = (
        "recommend=0.8,events=0.2"
    ),
    users: Annotated[int, _opt("--users", help="Distinct users, drawn Zipf.")] = 1000,
    zipf_s: Annotated[float, _opt("--zipf", help="Zipf exponent of the user draw.")] = 1.1,
    k: Annotated[int, _opt("--k", help="Recommendations asked per request.")] = 10,
    events_per_post: Annotated[int, _opt("--events-per-post", help="Events in one POST /v1/events.")] = 1,
    users_per_post: Annotated[int, _opt("--users-per-post", help="Users those events are spread over.")] = 1,
    item_sampling: Annotated[str, _opt("--item-sampling", help="popularity (weight popularity + 1) or uniform.")] = (
        "popularity"
    ),
    items_page_size: Annotated[int, _opt("--items-page-size", help="limit of each GET /v1/items page.")] = 1000,
    max_items: Annotated[int, _opt("--max-items", help="Read at most this many catalogue items.")] = 100_000,
    user_prefix: Annotated[str, _opt("--user-prefix", help="User ids are PREFIX<rank>.")] = "load-",
    api_key: Annotated[str | None, _opt("--api-key", envvar="HYTREC_API_KEY", help="Bearer key.")] = None,
    timeout: Annotated[float, _opt("--timeout", help="Seconds from the scheduled send; counted at this latency.")] = (
        5.0
    ),
    max_in_flight: Annotated[
        int, _opt("--max-in-flight", help="Outstanding requests (connections), all processes.")
    ] = (256),
    max_requests: Annotated[int, _opt("--max-requests", help="Cap on requests scheduled per rate.")] = 1_000_000,
    processes: Annotated[int, _opt("--processes", help="Generator processes, each rate/N with its own seed.")] = 1,
    seed: Annotated[int, _opt("--seed", help="Seed of the arrival and request draws.")] = 0,
    calibrate: Annotated[
        bool,
        _opt(
            "--calibrate",
            help=f"Measure the generator's own ceiling on a trivial local endpoint (rates: "
            f"--sweep, default {CALIBRATION_RATES}).",
        ),
    ] = False,
    calibrate_p99_ms: Annotated[float, _opt("--calibrate-p99-ms", help="Calibration: largest p99 that passes.")] = (
        10.0
    ),
    ceiling: Annotated[
        float | None, _opt("--ceiling", help="Calibrated ceiling, req/s: warn above a third of it.")
    ] = None,
    json_out: Annotated[Path | None, _opt("--json-out", help="Write the full report (JSON) here.")] = None,
    plot: Annotated[Path | None, _opt("--plot", help="Write a PNG of latency against offered load here.")] = None,
    allow_remote: Annotated[bool, _opt("--allow-remote", help="Allow a non-loopback --url.")] = False,
) -> None:
    """Open-loop load: Poisson arrivals at a fixed rate, latency from the scheduled send, nothing dropped unseen.

    Each request leaves on schedule whatever earlier ones are doing; over --max-in-flight it counts as dropped.

    Every scheduled request ends as a status, a timeout, a connection error or a drop.

    Calibrate first (--calibrate): used above a third of its ceiling, the generator measures itself.
    """
    try:
        from hytrec.loadtest import engine, report
        from hytrec.loadtest.hello import HelloProcess
        from hytrec.loadtest.wire import Target
        from hytrec.loadtest.workload import Workload, fetch_items, parse_mix, parse_rates
    except ImportError as exc:  # hdrhistogram comes with the train extra
        typer.echo(f"error: {exc}; install with `pip install 'hytrec[train]'`", err=True)
        raise typer.Exit(2) from exc

    def fail(message: str) -> typer.Exit:
        typer.echo(f"error: {message}", err=True)
        return typer.Exit(2)

    try:
        rates = parse_rates(sweep or (CALIBRATION_RATES if calibrate else str(rate)))
        shares = {"hello": 1.0} if calibrate else parse_mix(mix)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if min(duration, timeout) <= 0 or warmup < 0 or min(processes, max_in_flight, max_requests) < 1:
        raise fail("--duration and --timeout must be positive, --processes/--max-in-flight/--max-requests >= 1")
    if item_sampling not in ("popularity", "uniform"):
        raise fail("--item-sampling is popularity or uniform")
    warnings: list[str] = []
    if ceiling and not calibrate and max(rates) > ceiling / 3:
        warnings.append(
            f"offered {max(rates):g} req/s is above a third of the generator's calibrated ceiling ({ceiling:g} "
            f"req/s): the latencies may be the generator's own"
        )
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    workload = Workload(
        shares, users, zipf_s, k, events_per_post, users_per_post, user_prefix=user_prefix, api_key=api_key
    )
    with contextlib.ExitStack() as stack:
        if calibrate:
            url = stack.enter_context(HelloProcess()).url
        target = Target(url)
        if not target.is_loopback() and not allow_remote:
            raise fail(f"{url} is not a loopback address; pass --allow-remote to load another machine")
        if "events" in shares:
            with engine.event_loop_runner() as runner:
                try:
                    ids, pops = runner.run(fetch_items(target, api_key, items_page_size, max_items))
                except (OSError, RuntimeError, ValueError, KeyError, TimeoutError) as exc:
                    raise fail(f"could not read the catalogue from {url}/v1/items: {exc!r}") from exc
            workload.items = ids
            workload.item_weights = [p + 1.0 for p in pops] if item_sampling == "popularity" else None
        try:
            workload.check()
        except ValueError as exc:
            raise fail(str(exc)) from exc
        typer.echo(
            f"{len(rates)} rate(s) on {url}, at most {len(rates) * (warmup + duration + timeout):.0f} s", err=True
        )
        runs = []
        gens = stack.enter_context(engine.Generators(processes))
        for i, r in enumerate(rates):
            plan = engine.Plan(
                url,
                workload,
                r,
                duration,
                warmup,
                timeout,
                max_in_flight=math.ceil(max_in_flight / processes),
                max_requests=math.ceil(max_requests / processes),
                seed=seed,
            )
            runs.append(report.merge_run(gens.run(plan, i), r, shares, duration, timeout))
            total = runs[-1]["endpoints"].get("all") or runs[-1]["endpoints"][next(iter(shares))]
            p99 = total["latency_ms"]["p99"]
            typer.echo(f"  {r:g} req/s: answered {total['answer_rps']:g}/s, p99 {p99} ms", err=True)
    out: dict[str, Any] = {
        "tool": "hytrec loadtest",
        "mode": "calibrate" if calibrate else "load",
        "url": url,
        "config": {
            "rates": rates,
            "duration_s": duration,
            "warmup_s": warmup,
            "mix": shares,
            "users": users,
            "zipf": zipf_s,
            "k": k,
            "events_per_post": events_per_post,
            "users_per_post": users_per_post,
            "item_sampling": item_sampling,
            "items": len(workload.items),
            "timeout_s": timeout,
            "max_in_flight": max_in_flight,
            "processes": processes,
            "seed": seed,
            "ceiling_rps": ceiling,
        },
        "warnings": warnings,
        "runs": runs,
    }
    typer.echo(report.table(runs))
    title = f"hytrec loadtest {out['mode']}: {url}, {processes} process(es), {duration:g} s per rate"
    mark = (ceiling / 3, "generator ceiling / 3") if ceiling else None
    if calibrate:
        found = _calibration(out, calibrate_p99_ms)
        title += f", ceiling {'none' if found is None else f'{found:g}'} req/s"
        mark = (found, "generator ceiling") if found else None
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=1) + "\n")
    if plot is not None:
        report.plot(runs, plot, title, mark)


def _calibration(out: dict[str, Any], p99_ms: float) -> float | None:
    """Add the calibration verdict to the report and say it; the ceiling found (None: no rate passed)."""
    from hytrec.loadtest.report import KEEP_UP

    found, verdicts = calibration_ceiling(out["runs"], p99_ms)
    all_passed = all(v["pass"] for v in verdicts)
    out["calibration"] = {
        "ceiling_rps": found,
        "criterion": f"answered >= {KEEP_UP:.0%} of scheduled, no drop/timeout/error, p99 <= {p99_ms:g} ms, "
        "and every lower rate passes too",
        "rates": verdicts,
        "all_passed": all_passed,  # then the ceiling is only a lower bound
    }
    if found is None:
        typer.echo(f"generator ceiling: below {min(v['offered_rps'] for v in verdicts):g} req/s (no rate passed)")
    else:
        top = " (every rate passed: the real ceiling is higher, try higher rates)" if all_passed else ""
        typer.echo(f"generator ceiling: {found:g} req/s{top}; load a server at most {found / 3:.0f} req/s with it")
    return found


def main() -> None:
    """``python -m hytrec.loadtest``: the command alone, without the rest of the ``hytrec`` CLI."""
    app = typer.Typer(add_completion=False)
    app.command()(loadtest)
    app(prog_name="python -m hytrec.loadtest")
