"""Overload with a fault inside it: 4x capacity offered open loop while Redis is paused, on a 10^5-item catalogue.

The serving page's overload section measures shedding on a healthy Redis. This one asks what the reliability
goal asks: at about 4x a worker's capacity, with the state store paused (``CLIENT PAUSE <ms> ALL``) in the middle
of the overload, are requests still answered within milliseconds, the rest bounded by the request deadline,
memory bounded, and does it recover when the load drops?

One fresh ``hytrec serve`` (one worker, default settings, its own embedded Redis) of the serving bench's
random-weight 10^5-item checkpoint, users pre-warmed; the load is the serving bench's open-loop generator
(latency from the scheduled send), phases back to back on one clock: a baseline, the overload split in three
plans (before the pause, the plan holding the pause, after it), and a recovery in one-second windows. Before the
load, the generator's own ceiling is checked against a trivial endpoint at 3x the overload rate. The server's
shed counters (``hytrec_shed_total`` by path and reason) are read from ``/metrics`` before and after.

    nice -n 10 .venv/bin/python -m hytrec.benchmarks.overload_fault --compare HYTREC_QUEUE_MEMORY_INTERVALS=0 \
        --rounds 2 --json docs/benchmarks/overload_fault.json

(``--compare KEY=VALUE``: a second variant of the server's settings, run interleaved with the defaults;
``--from-json``: summarise a result again without measuring.)
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import redis
import typer

from hytrec.benchmarks.harness import BenchPage, markdown_table, read_json, run_isolated, write_json
from hytrec.benchmarks.serving_bench import Lab, Settings, get_json, make_checkpoint, sec_ceiling, timeline, vm_kb
from hytrec.benchmarks.serving_bench import workload as make_workload
from hytrec.benchmarks.serving_report import _f, _statuses, non_2xx_latency, recovery_s
from hytrec.state_store.embedded import registry

SCHEMA = "hytrec-bench-overload-fault/1"


def _families(url: str) -> list[Any]:
    """The server's /metrics, parsed by prometheus-client's own text parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def shed_counts(url: str) -> dict[str, float]:
    """``hytrec_shed_total`` by ``path/reason``."""
    return {
        f"{s.labels['path']}/{s.labels['reason']}": s.value
        for fam in _families(url)
        if fam.name == "hytrec_shed"
        for s in fam.samples
        if s.name == "hytrec_shed_total"
    }


SERVER_HISTOGRAMS = (
    "hytrec_http_request_seconds",
    "hytrec_event_loop_lag_seconds",
    "hytrec_microbatch_queue_wait_seconds",
    "hytrec_microbatch_compute_seconds",
)


def server_histograms(url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts (upper bound in s: count) of :data:`SERVER_HISTOGRAMS` from /metrics, series of a
    family added together, split by ``status`` for the request latency (``<family>/<status>``)."""
    out: dict[str, dict[float, float]] = {}
    for fam in _families(url):
        if fam.name not in SERVER_HISTOGRAMS:
            continue
        for sample in fam.samples:
            if sample.name.endswith("_bucket"):
                key = fam.name + (f"/{sample.labels['status']}" if "status" in sample.labels else "")
                le = float(sample.labels["le"])
                series = out.setdefault(key, {})
                series[le] = series.get(le, 0.0) + sample.value
    return out


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Count and the upper bucket bound (ms) holding the median and the 99th percentile of the observations made
    between two scrapes (a bound, as coarse as the buckets)."""
    diff = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    n = diff[-1][1] if diff else 0.0
    out: dict[str, Any] = {"count": int(n)}
    for q in (0.5, 0.99):
        bound = next((le for le, c in diff if c >= q * n), math.inf) if n else None
        out[f"p{q * 100:g}_le_ms"] = None if bound is None else (bound * 1e3 if bound != math.inf else "inf")
    return out


def pause_at(sock: str, at_perf: float, ms: int, log: dict[str, Any]) -> threading.Thread:
    """``CLIENT PAUSE ms ALL`` on the embedded Redis at ``time.perf_counter() == at_perf`` (a thread)."""

    def go() -> None:
        with redis.Redis(unix_socket_path=sock, socket_timeout=5) as r:
            r.ping()
            time.sleep(max(0.0, at_perf - time.perf_counter()))
            log["paused_at_perf"] = time.perf_counter()
            r.execute_command("CLIENT", "PAUSE", str(ms), "ALL")

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def one_run(
    lab: Lab, extra: dict[str, str], rate: float, pause_ms: int, spans: tuple[float, float, float]
) -> dict[str, Any]:
    """A fresh server (``extra`` in its environment) through baseline, overload (pause inside) and recovery."""
    s, (lead_s, hold_s, tail_s) = lab.s, spans
    with lab.fresh(False, extra=extra) as (srv,):
        reg = registry(srv.data)
        if reg is None:
            raise RuntimeError("the server's embedded Redis has no registry")
        shed_before, rss_before, hist_before = shed_counts(srv.url), vm_kb(srv.pid), server_histograms(srv.url)
        phases = [
            ("baseline", s.recover_rps, s.baseline_s, True),
            ("overload", rate, lead_s, False),
            ("overload_paused", rate, hold_s, False),
            ("overload_after", rate, tail_s, False),
            ("recovery", s.recover_rps, s.recover_s, True),
        ]
        start = time.perf_counter() + 0.5 + 0.1 * (round(s.baseline_s) + 3 + round(s.recover_s))
        fault: dict[str, Any] = {"pause_ms": pause_ms, "offset_in_plan_s": 0.5}
        planned = start + s.baseline_s + lead_s + 0.5
        thread = pause_at(reg["unixsocket"], planned, pause_ms, fault)
        tl = timeline(srv.url, make_workload(s, lab.items), phases, s, start=start)
        thread.join(10)
        fault["late_ms"] = round((fault.get("paused_at_perf", float("nan")) - planned) * 1e3, 1)
        rss = {"before": rss_before, "after": vm_kb(srv.pid), "peak_hwm": vm_kb(srv.pid, "VmHWM")}
        time.sleep(2)
        rss["after_2s"] = vm_kb(srv.pid)
        after, hist_after = shed_counts(srv.url), server_histograms(srv.url)
        inside = {k: bucket_quantiles(hist_before.get(k, {}), v) for k, v in sorted(hist_after.items())}
        shed = {k: after[k] - shed_before.get(k, 0.0) for k in sorted(after) if after[k] - shed_before.get(k, 0.0)}
        ready = get_json(srv.url, "/readyz")
    return {"env": extra, "fault": fault, "rss_kb": rss, "shed_by_path_reason": shed, "server_side": inside,
            "ready_after": ready, **tl}  # fmt: skip


def run(
    s: Settings, rate: float, pause_ms: int, spans: tuple[float, float, float], variants: dict[str, dict[str, str]],
    rounds: int,
) -> dict[str, Any]:  # fmt: skip
    """Ceiling check, then ``rounds`` rounds of one run per variant (interleaved: the machine is shared)."""
    page = BenchPage.start()
    with tempfile.TemporaryDirectory(prefix="hytrec-bench-overload-fault-") as tmp:
        ckpt, logs = Path(tmp) / "checkpoint", Path(tmp) / "logs"
        logs.mkdir()
        version = run_isolated(make_checkpoint, str(ckpt), s.n_items, s.d_model, s.state_dtype, timeout_s=600).unwrap()
        lab = Lab(replace(s, overload_rps=rate, calib_rates=(rate, 2 * rate, 3 * rate)), ckpt, logs, None, logs)
        ceiling = sec_ceiling(lab)
        runs = [
            {"variant": name, "round": rnd, **one_run(lab, extra, rate, pause_ms, spans)}
            for rnd in range(rounds)
            for name, extra in variants.items()
        ]
    return {
        "schema": SCHEMA,
        "rate_rps": rate,
        "ceiling": {k: ceiling[k] for k in ("ceiling_rps", "all_passed", "ceiling_over_highest", "verdicts")},
        "runs": runs,
        "meta": page.finish().meta(settings={"rate_rps": rate, "pause_ms": pause_ms, "spans_s": list(spans),
                                             "n_items": s.n_items, "mix": s.mix, "users": s.users,
                                             "variants": variants, "rounds": rounds}, model_version=version),
    }  # fmt: skip


def summary(res: dict[str, Any]) -> str:
    """Per run: a row per phase, the server's own histograms, the shed counters; then the generator's ceiling."""
    lines: list[str] = []
    for r in res["runs"]:
        lines += [f"### {r['variant']}, round {r['round']} ({json.dumps(r['env']) if r['env'] else 'defaults'})", ""]
        lines += run_summary(r)
        lines.append("")
    c = res["ceiling"]
    lines.append(
        f"Generator ceiling {c['ceiling_rps']} req/s on a trivial endpoint ({c['ceiling_over_highest']}x the "
        f"overload rate; all calibration rates passed: {c['all_passed']})."
    )
    return "\n".join(lines)


def run_summary(res: dict[str, Any]) -> list[str]:
    """One run: a markdown table per phase, the server's histograms and shed counters."""
    rows = []
    for name, ph in res["phases"].items():
        e = ph["endpoints"]["all"]
        non2 = non_2xx_latency(e)
        rows.append([name, f"{ph['offered_rps']:g}", f"{e['scheduled']:,}", _statuses(e),
                     _f(e["latency_2xx_ms"]["p50"]), _f(e["latency_2xx_ms"]["p99"]), _f(non2["p50"]), _f(non2["p99"]),
                     _f(non2["max"])])  # fmt: skip
    head = ["phase", "req/s", "scheduled", "statuses", "2xx p50 ms", "2xx p99 ms", "non-2xx p50", "non-2xx p99"]
    lines = markdown_table([*head, "non-2xx max"], rows, "lrrlrrrrr")
    srv = [[k, f"{v['count']:,}", v["p50_le_ms"], v["p99_le_ms"]] for k, v in res["server_side"].items() if v["count"]]
    lines += ["", "Seen by the server over the whole load (a quantile is the bucket bound that holds it):", ""]
    lines += markdown_table(["histogram", "count", "p50 <= ms", "p99 <= ms"], srv, "lrrr")
    base = res["phases"]["baseline"]["endpoints"]["all"]["latency_ms"]["p99"]
    rec = recovery_s(res["windows"], 2 * base)
    mb = {k: v and v / 1024 for k, v in res["rss_kb"].items()}
    return [
        *lines,
        "",
        f"Redis paused {res['fault']['pause_ms']} ms, {res['fault']['late_ms']} ms after its planned instant "
        f"(0.5 s into `overload_paused`). Shed by the server: {json.dumps(res['shed_by_path_reason'])}.",
        f"Recovery: p99 back within 2x the baseline p99 ({_f(base)} ms) "
        + (f"{rec:g} s after the overload ended." if rec is not None else "not within the recovery phase."),
        f"Worker RSS {_f(mb['before'])} MB before, {_f(mb['after'])} MB after, {_f(mb['after_2s'])} MB 2 s later, "
        f"peak {_f(mb['peak_hwm'])} MB.",
    ]


def main(
    rate: Annotated[float, typer.Option(help="Offered rate of the overload, req/s (about 4x one worker's).")] = 1600,
    pause_ms: Annotated[int, typer.Option(help="CLIENT PAUSE length inside the overload.")] = 1500,
    lead_s: Annotated[float, typer.Option(help="Overload before the plan that holds the pause.")] = 10.0,
    hold_s: Annotated[float, typer.Option(help="The plan that holds the pause (it starts 0.5 s in).")] = 4.0,
    tail_s: Annotated[float, typer.Option(help="Overload after it.")] = 16.0,
    compare: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE setting of a second variant, run interleaved (repeatable).")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of one run per variant.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")] = None,
    from_json: Annotated[Path | None, typer.Option("--from-json", help="Measure nothing: summarise this.")] = None,
) -> None:
    variants: dict[str, dict[str, str]] = {"defaults": {}}
    if compare:
        variants["compared"] = dict(kv.split("=", 1) for kv in compare)
    if from_json is not None:
        res = read_json(from_json)
    else:
        res = run(Settings(), rate, pause_ms, (lead_s, hold_s, tail_s), variants, rounds)
    if json_out is not None:
        write_json(json_out, res)
    typer.echo(summary(res))


if __name__ == "__main__":
    typer.run(main)
