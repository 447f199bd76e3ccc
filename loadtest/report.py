"""Merging the processes' stats into one report per offered rate; the JSON, the stdout table and the plot.

Rates are given three ways so a generator or server that falls behind cannot hide: *offered* (the target),
*scheduled* (arrivals the Poisson process actually drew in the window), *sent* and *answered* (each divided by
the window or by the time the last one happened, whichever is longer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from hytrec.loadtest.engine import new_hist

PERCENTILES = (50.0, 95.0, 99.0, 99.9)
COUNTS = ("scheduled", "sent", "dropped", "answered", "timeouts", "conn_errors")
KEEP_UP = 0.98  # answered / scheduled rate at which a run counts as keeping up


def latency_ms(hist: HdrHistogram) -> dict[str, float | int | None]:
    """Percentiles of a histogram in milliseconds (None when it is empty)."""
    n = hist.get_total_count()
    out: dict[str, float | int | None] = {"count": n}
    for q in PERCENTILES:
        out[f"p{q:g}"] = round(hist.get_value_at_percentile(q) / 1000, 3) if n else None
    out["max"] = round(hist.get_max_value() / 1000, 3) if n else None
    out["mean"] = round(hist.get_mean_value() / 1000, 3) if n else None
    return out


def _decode(encoded: str) -> HdrHistogram:
    hist = new_hist()
    hist.decode_and_add(encoded)
    return hist


def merge_endpoint(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counts and statuses, take the latest times, add the histograms (exact: same bucket layout)."""
    acc: dict[str, Any] = {k: sum(p[k] for p in parts) for k in COUNTS}
    acc["status"] = {}
    for p in parts:
        for code, n in p["status"].items():
            acc["status"][code] = acc["status"].get(code, 0) + n
    acc["last_send"] = max(p["last_send"] for p in parts)
    acc["last_answer"] = max(p["last_answer"] for p in parts)
    acc["hist"], acc["hist_ok"] = new_hist(), new_hist()
    for p in parts:
        for key in ("hist", "hist_ok"):
            if isinstance(p[key], HdrHistogram):  # already merged (the "all" row)
                acc[key].add(p[key])
            else:
                acc[key].decode_and_add(p[key])
    return acc


def summarise(acc: dict[str, Any], offered: float, duration: float) -> dict[str, Any]:
    """One endpoint at one rate, as reported (histograms kept encoded under ``hdr`` for later analysis)."""
    out: dict[str, Any] = {k: acc[k] for k in COUNTS}
    out["status"] = dict(sorted(acc["status"].items()))
    ended = acc["answered"] + acc["timeouts"] + acc["conn_errors"] + acc["dropped"]
    out["unaccounted"] = acc["scheduled"] - ended  # 0 unless a request hung past its timeout (a bug)
    out["offered_rps"] = round(offered, 2)
    out["scheduled_rps"] = round(acc["scheduled"] / duration, 2)
    out["sent_rps"] = round(acc["sent"] / max(duration, acc["last_send"]), 2)
    out["answer_rps"] = round(acc["answered"] / max(duration, acc["last_answer"]), 2)
    out["latency_ms"] = latency_ms(acc["hist"])
    out["latency_2xx_ms"] = latency_ms(acc["hist_ok"])
    out["hdr"] = {"all": acc["hist"].encode().decode(), "2xx": acc["hist_ok"].encode().decode()}
    return out


def merge_run(
    results: list[dict[str, Any]], rate: float, mix: dict[str, float], duration: float, timeout: float
) -> dict[str, Any]:
    """The report of one offered rate from the stats of every generator process."""
    endpoints: dict[str, Any] = {}
    accs = []
    for name, share in mix.items():
        acc = merge_endpoint([r["endpoints"][name] for r in results])
        accs.append(acc)
        endpoints[name] = summarise(acc, rate * share, duration)
    if len(mix) > 1:
        endpoints["all"] = summarise(merge_endpoint(accs), rate, duration)
    total = endpoints["all"] if "all" in endpoints else next(iter(endpoints.values()))
    lag = new_hist()
    for r in results:
        lag.decode_and_add(r["lag"])
    keeps_up = (
        total["scheduled"] > 0
        and total["answer_rps"] >= KEEP_UP * total["scheduled_rps"]
        and total["dropped"] + total["timeouts"] + total["conn_errors"] == 0
    )
    return {
        "offered_rps": rate,
        "duration_s": duration,
        "timeout_s": timeout,
        "processes": len(results),
        "connections": sum(r["connections"] for r in results),
        "generator_lag_ms": latency_ms(lag),
        "keeps_up": keeps_up,
        "endpoints": endpoints,
    }


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) and v < 100 else f"{v:.0f}"


def _row(cells: tuple[str, ...] | list[str], widths: tuple[int, ...]) -> str:
    """Right-aligned cells, except the second (the endpoint name)."""
    pairs = enumerate(zip(cells, widths, strict=True))
    return "".join(f" {c:<{w - 1}}" if i == 1 else f"{c:>{w}}" for i, (c, w) in pairs)


def table(runs: list[dict[str, Any]]) -> str:
    """The human-readable summary: one line per rate and endpoint (latencies in ms)."""
    cols = ("rate", "endpoint", "sched", "sent", "drop", "answ", "t/o", "err", "sent/s", "answ/s")
    lat = ("p50", "p95", "p99", "p99.9", "max", "2xx p99")
    widths = (7, 10, 7, 7, 6, 7, 6, 5, 8, 8, 7, 7, 7, 7, 7, 8)
    lines = [_row(cols + lat, widths)]
    lines[0] += "  statuses / generator lag p99"
    for run in runs:
        for name, e in run["endpoints"].items():
            lm, ok = e["latency_ms"], e["latency_2xx_ms"]
            cells = [
                _fmt(run["offered_rps"]),
                name,
                *(str(e[k]) for k in COUNTS),
                _fmt(e["sent_rps"]),
                _fmt(e["answer_rps"]),
                *(_fmt(lm[k]) for k in ("p50", "p95", "p99", "p99.9", "max")),
                _fmt(ok["p99"]),
            ]
            line = _row(cells, widths)
            statuses = " ".join(f"{k}:{v}" for k, v in e["status"].items()) or "-"
            if e["unaccounted"]:
                statuses += f" UNACCOUNTED:{e['unaccounted']}"
            lines.append(f"{line}  {statuses}")
        lag = run["generator_lag_ms"]["p99"]
        lines.append(f"{'':>17} generator send lag p99 {_fmt(lag)} ms, {run['connections']} connections")
    return "\n".join(lines)


def _ratio(endpoint: dict[str, Any], key: str) -> float:
    return endpoint[key] / endpoint["scheduled_rps"] if endpoint["scheduled_rps"] else math.nan


def plot(runs: list[dict[str, Any]], path: Path, title: str, mark: tuple[float, str] | None = None) -> None:
    """Latency p50 and p99 per endpoint against offered load (log scale), and the sent and answered rates.

    ``mark``: a vertical line (rate, label), e.g. a third of the generator's calibrated ceiling.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rates = [r["offered_rps"] for r in runs]
    names = [n for n in runs[0]["endpoints"] if n != "all"]
    colours = plt.get_cmap("tab10").colors
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        for q, style, marker in (("p50", "-", "o"), ("p99", "--", "s")):
            ys = [r["endpoints"][name]["latency_ms"][q] for r in runs]
            ys = [math.nan if y is None else max(y, 1e-3) for y in ys]
            ax.plot(rates, ys, style, marker=marker, color=colour, label=f"{name} {q}")
        for key, style, label in (("answer_rps", "-o", "answered"), ("sent_rps", ":x", "sent")):
            ratio = [_ratio(r["endpoints"][name], key) for r in runs]
            ax2.plot(rates, ratio, style, color=colour, label=f"{name} {label}")
    if any(e["timeouts"] for r in runs for e in r["endpoints"].values()):
        timeout_ms = runs[0]["timeout_s"] * 1000
        ax.axhline(timeout_ms, color="grey", linestyle=":", linewidth=1, label=f"timeout ({timeout_ms:g} ms)")
    if mark is not None and min(rates) / 2 <= mark[0] <= 2 * max(rates):
        for a in (ax, ax2):
            a.axvline(mark[0], color="black", linestyle="-.", linewidth=1, label=mark[1])
    elif mark is not None:  # far off the measured range: say it rather than squash the data
        title += f" ({mark[1]}: {mark[0]:.0f} req/s)"
    ax2.axhline(KEEP_UP, color="grey", linestyle="--", linewidth=1, label=f"{KEEP_UP:.0%}")
    log_axes = [ax.yaxis]
    ax.set_yscale("log")
    if max(rates) / min(rates) >= 4:
        ax.set_xscale("log")
        ax2.set_xscale("log")
        log_axes.append(ax2.xaxis)
    for axis in log_axes:  # ticks at 1, 2, 5 x 10^n, written plainly
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    if ax.get_xscale() == "log":
        for a in (ax, ax2):
            a.set_xticks(rates)
            a.xaxis.set_minor_formatter(NullFormatter())
    for axis in (ax.xaxis, ax.yaxis, ax2.xaxis, ax2.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("offered load, all endpoints (req/s)")
    ax.set_ylabel("latency from the scheduled send (ms, log scale)")
    ax.set_title("latency against offered load")
    ax2.set_xlabel("offered load, all endpoints (req/s)")
    ax2.set_ylabel("rate / scheduled rate")
    ax2.set_title("keeping up: sent and answered rates")
    ax2.set_ylim(0, max(1.1, ax2.get_ylim()[1]))
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.14), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
