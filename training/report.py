"""Results tables from training runs: per-model metrics, per-bucket figures, paired bootstrap CIs, a plot.

Reads run directories written by ``hytrec train`` (``metrics.json``, ``log.jsonl``, ``test_ranks.npy``) and
prints a Markdown report; runs of the same model type are averaged over seeds (mean ± std). Comparisons
pair users: every run of one data file ranks the same test users in the same order.

The bucket figure is drawn from the same numbers as the bucket table, so a page that keeps the table can
have its figure redrawn without the runs (:func:`redraw_page_figures`, ``hytrec results --from-page``).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hytrec.training.config import run_tie_seed
from hytrec.training.data import BUCKET_LABELS, Interactions, leave_one_out
from hytrec.training.metrics import paired_bootstrap, paired_bootstrap_ratio, per_user_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@500", "NDCG@500")
BUCKET_TABLE_TITLE = "HR@10 / NDCG@10 by history length of the test prediction:"
FIGURE_ALT = "HR@10 by history-length bucket"

# One colour per model type in every figure (Okabe-Ito, colour-blind safe): a reader who learnt that HyTRec is
# blue in one plot finds it blue in the next. The HyTRec variants are blues and greens, the baseline stands apart.
MODEL_COLOURS: dict[str, str] = {
    "hytrec": "#0072B2",
    "hytrec-notime": "#56B4E9",
    "tadn-only": "#009E73",
    "recent-softmax": "#CC79A7",
    "hytrec-intent": "#000000",
    "hytrec-hybrid": "#E69F00",
    "sasrec": "#D55E00",
}
OTHER_COLOUR = "#7F7F7F"  # a model type this table does not know yet


def model_colour(model_type: str) -> str:
    return MODEL_COLOURS.get(model_type, OTHER_COLOUR)


@dataclass(frozen=True)
class BucketBars:
    """One model's metric per history-length bucket: mean over seeds and, with two seeds or more, their std."""

    model: str
    seeds: int
    mean: tuple[float, ...]  # aligned with BUCKET_LABELS; NaN for an empty bucket
    std: tuple[float, ...] | None  # sample std (ddof=1) over seeds; None with one seed


def load_run(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    log_path = run / "log.jsonl"  # absent for a run rebuilt from a published checkpoint
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    unfiltered = run / "test_ranks_unfiltered.npy"  # the repeat-aware protocol; runs before it lack the file
    config_path = run / "config.json"
    slow = json.loads(config_path.read_text()).get("config", {}).get("slow_heads") if config_path.exists() else None
    if slow:  # a row of its own: runs with slow heads are another model, not another seed
        metrics = {**metrics, "model_type": f"{metrics['model_type']}-slow{slow}"}
    return {
        **metrics,
        "dir": str(run),
        "tie_seed": run_tie_seed(run),  # the order its test split was built in; None: file order
        "ranks": np.load(run / "test_ranks.npy"),
        "ranks_unfiltered": np.load(unfiltered) if unfiltered.exists() else None,
        "log": log,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _ratio(x: float) -> str:
    """A ratio for the table; resamples whose baseline mean is 0 come back as inf or the largest float."""
    return "inf" if not math.isfinite(x) or x >= 1e300 else f"{x:.3f}"


def bars_from_runs(by_type: dict[str, list[dict[str, Any]]], metric: str = "HR@10") -> list[BucketBars]:
    """Seed mean and std of ``metric`` per bucket, one entry per model type (in the order of ``by_type``)."""
    out = []
    for model_type, rs in by_type.items():
        values = np.array([[r["test"][b][metric] for b in BUCKET_LABELS] for r in rs], dtype=np.float64)
        std = tuple(np.std(values, axis=0, ddof=1).tolist()) if len(rs) >= 2 else None
        out.append(BucketBars(model_type, len(rs), tuple(values.mean(axis=0).tolist()), std))
    return out


def report(runs: list[Path], baseline: str = "sasrec", candidate: str = "hytrec", plot: Path | None = None) -> str:
    loaded = [load_run(r) for r in runs]
    data_files = {str(Path(r["data"]).resolve()) for r in loaded}  # runs may name one file by different paths
    if len(data_files) != 1:
        raise ValueError(f"runs of one report must share one data file, got {sorted(data_files)}")
    data_file = data_files.pop()
    tie_seeds = {r["tie_seed"] for r in loaded}
    if len(tie_seeds) != 1:  # another tie order makes another test split: a different target for some users
        orders = sorted(f"{r['dir']}: {'file order' if r['tie_seed'] is None else r['tie_seed']}" for r in loaded)
        raise ValueError(f"runs of one report must share one tie order (their test targets differ), got {orders}")
    tie_seed = tie_seeds.pop()
    buckets = leave_one_out(Interactions.from_file(data_file)).test.buckets
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in loaded:
        by_type[r["model_type"]].append(r)

    ties = "" if tie_seed is None else f"; ties in the random order of tie seed {tie_seed}"
    lines = [f"Data: `{data_file}`; test users: {len(buckets)}{ties}; seeds per row in parentheses.", ""]
    lines += ["| model (seeds) | " + " | ".join(METRICS) + " | s / epoch | best epoch / run |"]
    lines += ["|---" * (len(METRICS) + 3) + "|"]
    for model_type, rs in by_type.items():
        cells = [_mean_std([r["test"]["all"][m] for r in rs]) for m in METRICS]
        timed = [np.median([e["train_seconds"] for e in r["log"]]) for r in rs if r["log"]]  # median: robust to pauses
        epoch_s = f"{np.mean(timed):.0f}" if timed else "–"
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in rs)
        lines.append(f"| {model_type} ({len(rs)}) | " + " | ".join(cells) + f" | {epoch_s} | {epochs} |")
    lines += ["", BUCKET_TABLE_TITLE, ""]
    counts = [int((buckets == i).sum()) for i in range(len(BUCKET_LABELS))]
    lines += ["| model | " + " | ".join(f"{b} (n={n})" for b, n in zip(BUCKET_LABELS, counts, strict=True)) + " |"]
    lines += ["|---" * (len(BUCKET_LABELS) + 1) + "|"]
    for model_type, rs in by_type.items():
        cells = []
        for b, n in zip(BUCKET_LABELS, counts, strict=True):
            hr = _mean_std([r["test"][b]["HR@10"] for r in rs]) if n else "–"
            nd = _mean_std([r["test"][b]["NDCG@10"] for r in rs]) if n else "–"
            cells.append(f"{hr} / {nd}")
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")

    if baseline in by_type and candidate in by_type:
        protocols = [("ranks", "seen items excluded")]
        if all(r["ranks_unfiltered"] is not None for t in (candidate, baseline) for r in by_type[t]):
            protocols.append(("ranks_unfiltered", "nothing excluded (repeat-aware)"))
        for key, protocol in protocols:
            lines += [
                "",
                f"Paired bootstrap over users (1000 resamples), {candidate} vs {baseline}, seed-averaged "
                f"per-user metrics, 95% CI" + ("" if key == "ranks" else f"; {protocol}") + ":",
                "",
            ]
            lines += _bootstrap_rows(by_type, candidate, baseline, buckets, key)
    if plot is not None:
        title = f"{FIGURE_ALT}: {Path(data_file).parent.name}/{Path(data_file).name}"
        save_figure(bucket_figure(bars_from_runs(by_type), counts, title=title), plot)
        lines += ["", f"![{FIGURE_ALT}]({plot.name})"]
    return "\n".join(lines)


def _bootstrap_rows(
    by_type: dict[str, list[dict[str, Any]]], candidate: str, baseline: str, buckets: np.ndarray, key: str
) -> list[str]:
    """Table rows of candidate − baseline (and their ratio) per user group, on the ranks stored under ``key``."""
    rows = ["| group | metric | difference [95% CI] | ratio [95% CI] |", "|---|---|---|---|"]
    per = {
        t: {m: np.mean([per_user_metrics(r[key])[m] for r in by_type[t]], axis=0) for m in METRICS[:2]}
        for t in (candidate, baseline)
    }
    groups = [("all", np.ones(len(buckets), bool)), (">=500", buckets >= 2)] + [
        (b, buckets == i) for i, b in enumerate(BUCKET_LABELS)
    ]
    for name, sel in groups:
        if not sel.any():
            continue
        for m in METRICS[:2]:
            a, b = per[candidate][m][sel], per[baseline][m][sel]
            d, lo, hi = paired_bootstrap(a, b)
            r, rlo, rhi = paired_bootstrap_ratio(a, b)
            rows.append(
                f"| {name} (n={int(sel.sum())}) | {m} | {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                f"| {_ratio(r)} [{_ratio(rlo)}, {_ratio(rhi)}] |"
            )
    return rows


def bucket_figure(
    bars: Sequence[BucketBars],
    counts: Sequence[int],
    title: str | None = None,
    metric: str = "HR@10",
    labels: Sequence[str] = BUCKET_LABELS,
) -> Figure:
    """Grouped bars of ``metric`` per bucket: colours from :data:`MODEL_COLOURS`, whiskers ±1 std over seeds.

    Buckets without a test user are left out (a gap would read as a score of 0), and the legend sits above
    the axes so it never covers a bar.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, no backend to pick

    shown = [i for i, n in enumerate(counts) if n > 0]
    if not shown or not bars:
        raise ValueError("nothing to plot: no model, or no bucket with a test user")
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(shown))
    width = 0.8 / len(bars)
    top = 0.0
    for i, b in enumerate(bars):
        mean = np.array([b.mean[j] for j in shown])
        std = np.array([b.std[j] for j in shown]) if b.std is not None else None
        label = f"{b.model} ({b.seeds} seed{'s' if b.seeds > 1 else ''})"
        ax.bar(
            x + (i - (len(bars) - 1) / 2) * width,
            mean,
            width,
            yerr=std,
            capsize=3 if std is not None else 0,
            error_kw={"elinewidth": 1, "ecolor": "black"},
            color=model_colour(b.model),
            label=label,
        )
        top = max(top, float(np.nanmax(mean + (std if std is not None else 0.0))))
    ax.set_xticks(x, [f"{labels[j]}\n(n={counts[j]:,})" for j in shown])
    ax.set_xlabel("events in the history (test users per bucket)")
    ax.set_ylabel(f"{metric} (test, seen items excluded)")
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ncol = min(len(bars), 3)  # three a row fit the width, whatever the number of model types
    whiskers = any(b.std is not None for b in bars)
    ax.legend(
        loc="lower left",
        bbox_to_anchor=(0, 1.02),
        ncol=ncol,
        frameon=False,
        fontsize="small",
        title="bars: mean over seeds; whiskers: ±1 std over seeds" if whiskers else None,
        title_fontsize="small",
        alignment="left",
    )
    if title:
        fig.suptitle(title, x=0.02, ha="left", fontsize="medium")
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120)


# --- redrawing a page's figures from its own bucket tables -------------------------------------------------

_CELL = re.compile(r"^\s*([0-9.]+)(?:\s*±\s*([0-9.]+))?\s*$")
_SEEDS = re.compile(r"^\|\s*(\S+)\s+\((\d+)\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _parse_mean_std(cell: str) -> tuple[float, float | None]:
    """``0.4216 ± 0.0041`` -> (0.4216, 0.0041); ``0.3940`` -> (0.3940, None); ``–`` (empty bucket) -> NaN."""
    if cell in ("–", "-"):
        return math.nan, None
    m = _CELL.match(cell)
    if m is None:
        raise ValueError(f"not a metric cell: {cell!r}")
    return float(m.group(1)), float(m.group(2)) if m.group(2) else None


@dataclass(frozen=True)
class PageFigure:
    """A bucket table of a results page and the PNG linked after it."""

    bars: list[BucketBars]  # HR@10
    counts: list[int]  # test users per bucket
    image: str  # the link, relative to the page
    heading: str | None  # the nearest Markdown heading above the table


def parse_bucket_tables(text: str) -> list[PageFigure]:
    """Each bucket table of a page written by :func:`report` that has a PNG linked after it.

    The link must come before the next bucket table. Seeds per model come from the ``| model (seeds) |``
    table above the bucket table; a model missing there counts as 1 seed, or 2 if its cells carry a std.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == BUCKET_TABLE_TITLE]
    headings, fenced = {}, False  # line index -> heading text, outside ``` blocks (a "# comment" is no heading)
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings[i] = line.lstrip("#").strip()
    found = []
    for k, start in enumerate(starts):
        seeds: dict[str, int] = {}
        for line in reversed(lines[(starts[k - 1] if k else 0) : start]):  # the nearest metrics table above
            if line.startswith("| model (seeds)"):
                break
            if m := _SEEDS.match(line):
                seeds[m.group(1)] = int(m.group(2))
        table = [line for line in lines[start + 1 :] if line.strip()]
        header, rows = table[0], []
        for line in table[2:]:
            if not line.startswith("|"):
                break
            rows.append(line)
        labels_n = [re.fullmatch(r"(.+?) \(n=(\d+)\)", c) for c in _cells(header)[1:]]
        if any(m is None for m in labels_n) or [m.group(1) for m in labels_n] != list(BUCKET_LABELS):
            raise ValueError(f"unexpected bucket-table header: {header!r}")
        counts = [int(m.group(2)) for m in labels_n]
        bars = []
        for row in rows:
            cells = _cells(row)
            model = cells[0].split()[0]  # "tadn-only †" -> "tadn-only"
            hr = [_parse_mean_std(c.split(" / ")[0].strip()) for c in cells[1:]]
            std = tuple(s if s is not None else math.nan for _, s in hr)
            has_std = any(s is not None for _, s in hr)
            n_seeds = seeds.get(model, 2 if has_std else 1)
            bars.append(BucketBars(model, n_seeds, tuple(v for v, _ in hr), std if has_std else None))
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        image = next((m.group(1) for line in lines[start:end] if (m := _IMAGE.search(line))), None)
        heading = next((headings[i] for i in range(start, -1, -1) if i in headings), None)
        if image is not None:
            found.append(PageFigure(bars, counts, image, heading))
    return found


def redraw_page_figures(page: Path) -> list[Path]:
    """Redraw every figure of a results page from the bucket table above it (the runs need not exist)."""
    written = []
    for fig in parse_bucket_tables(page.read_text()):
        path = page.parent / fig.image
        title = f"{FIGURE_ALT}: {fig.heading}" if fig.heading else FIGURE_ALT
        save_figure(bucket_figure(fig.bars, fig.counts, title=title), path)
        written.append(path)
    if not written:
        raise ValueError(f"{page}: no bucket table followed by a .png link")
    return written
