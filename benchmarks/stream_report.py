"""The page (docs/benchmarks/streams.md), summary and plot of ``hytrec bench streams``, from its JSON alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from hytrec.benchmarks.harness import BenchPage, markdown_table
from hytrec.benchmarks.profile_bench import frame_name

TITLE = "Event stream benchmark: `hytrec consume`"
PLOTS = {"lag": "streams_lag.png"}
OWN_CODE = ("model/", "service/", "state_store/", "streams/")
GOAL = 10_000.0  # events/s of one consumer (issue 12)


def method(res: dict[str, Any]) -> list[str]:
    st = res["meta"]["settings"]
    return [
        f"Server: {res.get('server', '?')}, the embedded Redis (unix socket, AOF fsync every second) started by the "
        "command in a temporary folder; every consumer is a real `hytrec consume` process attached to it "
        "(`HYTREC_DATA_DIR`), with the bundled demo model (500 items, d_model 64, 2 TADN layers, float16 states), "
        f"1 torch thread, `HYTREC_STREAM_BATCH_SIZE={st['batch']}`, `HYTREC_STREAM_LEASE_MS={st['lease_ms']}`. "
        "Everything shares the machine's CPUs: Redis, the consumers and this process (the producer, the sampling).",
        f"**Throughput.** {st['events']:,} events of {st['users']:,} users (drawn uniformly, so ~"
        f"{st['events'] // max(1, st['users'])} per user, each with an event id) are XADDed first; a gate key holds "
        "every partition's lease while the consumers load the model and register; then the gate opens. *events/s* "
        "= events / (time from the first lease taken to every partition drained: all delivered, none pending, "
        "polled every 50 ms). *busy events/s*: the consumers' own clocks, first batch read to last XACK. *CPU "
        "µs/event*: user + system CPU time of the consumer processes (and of redis-server) between those two moments "
        "(/proc/<pid>/stat) per event; on a shared machine it is steadier than the wall-clock rates. Every run "
        "checks that the users' stored event counts add up to the events produced and that the consumers applied "
        "exactly that many.",
        f"**Lag.** One consumer, one partition; a producer thread XADDs at a fixed rate (fractions "
        f"{', '.join(f'{f:g}' for f in st['lag_fractions'])} of the median 1-consumer throughput above) for "
        f"{st['lag_s']:g} s, then stops. Every {st['sample_s']:g} s: *lag entries* = produced - acknowledged (the "
        "consumer's `hytrec_stream_entries_total`, scraped from its /metrics); *lag s* = age of the oldest entry "
        "not yet acknowledged (its stream id's time; 0 when everything is acknowledged).",
    ]


def _rows_by(runs: list[dict[str, Any]]) -> dict[tuple[str, int, int, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault((r["code"], r["consumers"], r["partitions"], r["batch"]), []).append(r)
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def throughput_lines(sec: dict[str, Any]) -> list[str]:
    groups = _rows_by(sec["runs"])
    rows = []
    for (code, c, p, b), runs in groups.items():
        per = [r["events_per_s"] for r in runs]
        busy = [r["busy_events_per_s"] for r in runs if "busy_events_per_s" in r]
        split = " / ".join(
            "+".join(f"{t['applied']:,}" for t in r["consumers_totals"]) for r in runs
        )  # who applied what, per run
        cpu = [1000 * r["consumer_cpu_s"] / r["events"] for r in runs if "consumer_cpu_s" in r]
        rcpu = [1000 * r["redis_cpu_s"] / r["events"] for r in runs if "redis_cpu_s" in r]
        rows.append([
            code, c, p, b, len(runs), f"{_median(per):,.0f}", ", ".join(f"{x:,.0f}" for x in per),
            f"{_median(busy):,.0f}" if busy else "-", f"{_median(cpu) * 1000:,.0f}" if cpu else "-",
            f"{_median(rcpu) * 1000:,.0f}" if rcpu else "-", split,
            "yes" if all(r["exact"] for r in runs) else "**no**",
        ])  # fmt: skip
    header = ["code", "consumers", "partitions", "batch", "runs", "events/s (median)", "each run", "busy events/s",
              "consumer CPU µs/event", "Redis CPU µs/event", "applied per consumer", "counts exact"]  # fmt: skip
    lines = markdown_table(header, rows, "lrrrrrrrrrll")
    after = [r for r in sec["runs"] if r["code"] == "after" and r["consumers"] == 1]
    best = max((_median([x["events_per_s"] for x in rs]) for k, rs in groups.items() if k[0] == "after" and k[1] == 1),
               default=None)  # fmt: skip
    if after and best is not None:
        verdict = "met" if best >= GOAL else "**not met**"
        lines += ["", f"Goal, one consumer >= {GOAL:,.0f} events/s: {verdict} (best median {best:,.0f} events/s)."]
    if any(k[0] == "before" for k in groups):
        lines += ["", "Before/after (same configuration, runs alternating in one run, ratio of medians):", ""]
        ratio_rows = []
        for (code, c, p, n), runs in groups.items():
            if code != "after" or (("before", c, p, n) not in groups):
                continue
            old = groups[("before", c, p, n)]
            a = _median([r["events_per_s"] for r in runs])
            b = _median([r["events_per_s"] for r in old])
            cpu = "-"
            if all("consumer_cpu_s" in r for r in (*runs, *old)):
                ca, cb = (_median([r["consumer_cpu_s"] / r["events"] for r in rs]) for rs in (runs, old))
                cpu = f"{cb / ca:.2f}x"
            ratio_rows.append([c, p, n, f"{b:,.0f}", f"{a:,.0f}", f"{a / b:.2f}x", cpu])
        header = ["consumers", "partitions", "batch", "before events/s", "after events/s", "events/s ratio",
                  "consumer CPU per event, before / after"]  # fmt: skip
        lines += markdown_table(header, ratio_rows, "rrrrrrr")
    return lines


def lag_lines(sec: dict[str, Any]) -> list[str]:
    cap = sec.get("capacity_events_per_s")
    lines = [f"Rates are fractions of {cap:,.0f} events/s (the 1-consumer, 1-partition median above)." if cap else
             "No throughput measured: rates are fractions of 2,000 events/s.", ""]  # fmt: skip
    rows = []
    for r in sec["runs"]:
        drained = "not within the drain limit" if r["drained_after_s"] is None else f"{r['drained_after_s']:g} s"
        rows.append([
            f"{r['fraction']:g}", f"{r['rate']:,.0f}", f"{r['produced']:,}", f"{r['median_lag_s']:.2f}",
            f"{r['max_lag_s']:.2f}", f"{r['max_lag_entries']:,}", drained, "yes" if r["exact"] else "**no**",
        ])  # fmt: skip
    header = ["fraction", "rate events/s", "produced", "median lag s (while producing)", "max lag s",
              "max lag entries", "drained after the producer stopped", "counts exact"]  # fmt: skip
    return lines + markdown_table(header, rows, "rrrrrrll")


def top_functions(raw: str, n: int = 15) -> dict[str, Any]:
    """Self samples per (function, file), and inclusive ones for HyTRec's own code, from py-spy's raw stacks."""
    own: Counter[tuple[str, str]] = Counter()
    incl: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # py-spy names a file by its package path: "model/x.py" installed, "hytrec/model/x.py" from a package tree
        frames = [
            (fn, path.removeprefix("hytrec/"))
            for fn, path in (frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread ")))
        ]
        if not frames:
            continue
        c = int(count)
        total += c
        own[frames[-1]] += c
        for fr in {f for f in frames if f[1].startswith(OWN_CODE)}:
            incl[fr] += c

    def rows(counter: Counter[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"function": f, "file": p, "samples": c, "share": c / total} for (f, p), c in counter.most_common(n)]

    return {"samples": total, "self": rows(own), "inclusive": rows(incl)}


def profile_lines(sec: dict[str, Any]) -> list[str]:
    top = sec["top"]
    lines = [
        f"`{sec['raw']['command']}` attached to a 1-consumer, 1-partition run from the gate's opening to the "
        f"consumer's exit ({top['samples']:,} samples; {sec['raw']['events_per_s_under_profiler']:,.0f} events/s "
        f"under the profiler), then the same on a second run for the flame graph: [{sec['svg']}]({sec['svg']}). "
        "Idle threads are left out, so shares are of the time some thread of the consumer was running.",
        "",
        "Inclusive (HyTRec's code and what it calls):",
        "",
    ]
    rows = ([r["function"], r["file"], f"{100 * r['share']:.1f} %"] for r in top["inclusive"])
    lines += markdown_table(["function", "file", "share"], rows, "llr")
    lines += ["", "Self (the leaf frame):", ""]
    rows = ([r["function"], r["file"], f"{100 * r['share']:.1f} %"] for r in top["self"])
    return lines + markdown_table(["function", "file", "share"], rows, "llr")


SECTIONS = {"throughput": ("1. Throughput", throughput_lines), "lag": ("2. Lag under a fixed-rate producer", lag_lines),
            "profile": ("3. Profile of one consumer", profile_lines)}  # fmt: skip


def render_markdown(res: dict[str, Any], plots: dict[str, str]) -> str:
    regenerate = (
        "rerun the command to measure again, or add `--from-json docs/benchmarks/streams.json` to re-render it."
    )
    lines = BenchPage.from_meta(res["meta"]).header(TITLE, regenerate, method(res))
    if res.get("before"):
        b = res["before"]
        lines += [f"Before: the checkout at `{b['path']}` (commit `{(b['commit'] or '?')[:12]}`), its consumer run "
                  "through `PYTHONPATH` on the same server and settings; after: this checkout.", ""]  # fmt: skip
    for name, (title, fn) in SECTIONS.items():
        sec = res["sections"].get(name, {"status": "not measured", "reason": "absent"})
        lines += [f"## {title}", ""]
        if sec["status"] != "ok":
            lines += [f"Not measured: {sec.get('reason')}.", ""]
            continue
        lines += [*fn(sec), ""]
        if name in plots:
            lines += [f"![{title}]({plots[name]})", ""]
    return "\n".join(lines)


def render_summary(res: dict[str, Any]) -> str:
    out = []
    for name, (title, fn) in SECTIONS.items():
        sec = res["sections"].get(name)
        if sec and sec["status"] == "ok":
            out += [title, *fn(sec), ""]
        elif sec:
            out += [f"{title}: not measured ({sec.get('reason')})", ""]
    return "\n".join(out)


def write_plots(res: dict[str, Any], folder: Path) -> dict[str, str]:
    """The lag over time, one colour per rate: seconds behind (top) and entries behind (bottom)."""
    sec = res["sections"].get("lag", {})
    if sec.get("status") != "ok":
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colours = plt.get_cmap("tab10").colors
    for i, r in enumerate(sec["runs"]):
        ts = [x["t_s"] for x in r["samples"]]
        label = f"{r['rate']:,.0f} events/s ({r['fraction']:g}x)"
        a1.plot(ts, [x["lag_s"] for x in r["samples"]], "-", color=colours[i], label=label)
        a2.plot(ts, [x["lag_entries"] for x in r["samples"]], "-", color=colours[i], label=label)
    seconds = res["meta"]["settings"]["lag_s"]
    for ax in (a1, a2):
        ax.axvline(seconds, color="grey", ls=":", lw=1)
        ax.grid(True, alpha=0.3)
    a1.set(ylabel="oldest unacknowledged entry's age (s)", title="consumer lag, 1 consumer, 1 partition "
           f"(producer stops at {seconds:g} s, dotted)")  # fmt: skip
    a2.set(xlabel="time since the producer started (s)", ylabel="entries produced - acknowledged")
    a1.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(folder / PLOTS["lag"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return dict(PLOTS)
