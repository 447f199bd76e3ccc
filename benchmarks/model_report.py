"""The terminal tables, the page (docs/benchmarks/model.md) and the plot of ``hytrec bench model``.

Everything here reads the result JSON alone, so a page is re-rendered without measuring again
(``hytrec bench model --from-json docs/benchmarks/model.json --plot ... --markdown ...``).
matplotlib (the ``hytrec[train]`` extra) is imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hytrec.benchmarks.harness import BenchPage, markdown_table, threads_phrase, write_text
from hytrec.benchmarks.model_bench import (
    FLAT_GOAL,
    KERNELS,
    LOSS,
    MATH_ATTN_FACTOR,
    SCHEMA,
    SERIES,
    STATE_GOAL_BYTES,
)

TITLE = "Model benchmark: training step against length, serving cost against history"
# What "with loss" computed, by the meta.loss a run recorded.
LOSSES: dict[str, str] = {
    LOSS: "the trainer's full loss (computed in blocks of rows, so the L x catalogue logit matrix is never "
    "stored); at d_model 64 the catalogue products dominate.",
    "F.cross_entropy(model.logits(u).flatten(0, 1), targets)": "the trainer's full loss when this page was "
    "measured; at d_model 64 the (L x catalogue) logits dominate both time and memory.",
}
COLORS = {  # one colour per model, in every panel
    "hytrec": "tab:blue",
    "naive": "tab:red",
    "sasrec_flash": "tab:green",
    "sasrec": "tab:orange",
    "tadn_chunked": "tab:cyan",
    "tadn_naive": "tab:pink",
}
JSON_KEYS: list[tuple[str, str]] = [
    ("schema", f'"{SCHEMA}"'),
    (
        "meta",
        "date, command, quick, load averages at start/end, wall_s, settings, loss (what 'with loss' computed), "
        "and the machine: cpu, logical_cpus, cpus_available, torch, threads, omp_wait_policy, python, platform, "
        "git_commit, git_dirty (older JSON lacks cpus_available, git_commit, git_dirty and loss)",
    ),
    (
        "train_step[series][L]",
        "forward + backward of one sequence, loss = sum of outputs: status (ok | too slow | memory | "
        "timeout | error), seconds (median), runs, peak_rss_mb (process peak), peak_delta_mb (above the "
        "process before the model was built); series: " + ", ".join(SERIES),
    ),
    ("train_step_loss[series][L]", "the same with the full-softmax cross-entropy (not for naive, tadn_*)"),
    ("step_us[H] / step_us_batch[H]", "one serving step, microseconds per call for 1 user / for the batch"),
    ("request_us[H] / request_us_batch[H]", "user_vector + scores over the catalogue + top-10, per call"),
    ("build_state_s[H]", "seconds to build one user's state from H events (parallel form, no grad)"),
    ("state_bytes.{float32,float16,bfloat16}", "encode_state blob of one user, default config, full ring"),
    ("ratios.chunked_vs_naive_L4096", "naive / chunked seconds at L = 4096 (null if not both measured)"),
    ("ratios.chunked_vs_naive", "{L, ratio} at the largest L where both ran"),
    ("ratios.kernel_chunked_vs_naive_L4096", "the same for the delta rule alone (tadn_naive / tadn_chunked)"),
    ("ratios.hytrec_16k_over_1k[_loss]", "HyTRec time(16384) / time(1024), model only [with loss]"),
    ("ratios.softmax_16k_over_1k[_loss]", "the same for sasrec_flash (null if not run)"),
    ("ratios.softmax_math_16k_over_1k", "the same for sasrec (math kernel; null if not run)"),
    ("ratios.scaling[series]", "{from_L, to_L, length_ratio, time_ratio} over the measured range"),
    ("ratios.step_max_over_min / step_batch_max_over_min", "flatness of step_us / step_us_batch over H"),
    (
        "goals.{chunked_vs_naive_L4096_ge_20, hytrec_16k_over_1k_le_20, state_fp16_le_32KiB, step_flat_le_2x}",
        "booleans (null when the figure was not measured, e.g. with --quick)",
    ),
]


# --------------------------------------------------------------------------------------------- tables
def _fmt_point(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    if p.get("status") != "ok":
        return f"not run ({p['status']})" if p["status"] in ("too slow", "memory") else p["status"]
    return f"{p['seconds']:.3f} s / {p['peak_delta_mb']:.0f} MB"


def _train_table(table: dict[str, dict[str, Any]], lengths: list[str]) -> list[str]:
    rows = ([n, *(_fmt_point(row.get(n)) for row in table.values())] for n in lengths)
    return markdown_table(["L", *table], rows, "r" * (len(table) + 1))


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def _goal_rows(res: dict[str, Any]) -> list[str]:
    r, g = res["ratios"], res["goals"]
    cvn = r["chunked_vs_naive"]

    def ok(v: bool | None) -> str:
        return "not measured" if v is None else ("PASS" if v else "FAIL")

    rows = [
        ("chunked vs naive recurrence, fwd+bwd, L = 4096", _fmt(r["chunked_vs_naive_L4096"], ".1f", "x"), ">= 20x")
        + (ok(g["chunked_vs_naive_L4096_ge_20"]),),
        (f"(chunked vs naive at the largest L both ran: {cvn['L']})", _fmt(cvn["ratio"], ".1f", "x"), "", ""),
        (
            "(the delta rule alone, chunked vs literal loop, L = 4096)",
            _fmt(r["kernel_chunked_vs_naive_L4096"], ".1f", "x"),
            "",
            "",
        ),
        ("HyTRec time(16384) / time(1024), model only", _fmt(r["hytrec_16k_over_1k"]), "<= 20")
        + (ok(g["hytrec_16k_over_1k_le_20"]),),
        ("HyTRec time(16384) / time(1024), with loss", _fmt(r["hytrec_16k_over_1k_loss"]), "(<= 20)", ""),
        ("softmax (flash) time(16384) / time(1024), model only", _fmt(r["softmax_16k_over_1k"]), "(compare)", ""),
        ("softmax (flash) time(16384) / time(1024), with loss", _fmt(r["softmax_16k_over_1k_loss"]), "(compare)", ""),
        ("softmax (math) time(16384) / time(1024)", _fmt(r["softmax_math_16k_over_1k"]), "(compare)", ""),
        ("state bytes per user, fp16", res["state_bytes"]["float16"], f"<= {STATE_GOAL_BYTES}")
        + (ok(g["state_fp16_le_32KiB"]),),
        ("step cost max/min over history length (1 user)", _fmt(r["step_max_over_min"]), f"<= {FLAT_GOAL}")
        + (ok(g["step_flat_le_2x"]),),
    ]
    return markdown_table(["goal", "figure", "target", "result"], rows, "lrrl")


def _serving_rows(res: dict[str, Any]) -> list[str]:
    b = res["meta"]["settings"]["serve_batch"]
    header = [
        "H (events behind the state)",
        "step, 1 user (us)",
        f"step, {b} users (us per user)",
        "request, 1 user (us)",
        f"request, {b} users (us per user)",
        "build_state (s)",
    ]
    rows = (
        [
            h,
            f"{res['step_us'][h]:.1f}",
            f"{res['step_us_batch'][h] / b:.1f}",
            f"{res['request_us'][h]:.1f}",
            f"{res['request_us_batch'][h] / b:.1f}",
            f"{res['build_state_s'][h]:.3f}",
        ]
        for h in res["step_us"]
    )
    return markdown_table(header, rows, "rrrrrr")


def _state_bytes(res: dict[str, Any]) -> list[str]:
    sb = res["state_bytes"]
    return markdown_table(list(sb), [list(sb.values())], "r" * len(sb))


def render_text(res: dict[str, Any]) -> str:
    """Plain-text report for the terminal."""
    m = res["meta"]
    lengths = [str(n) for n in m["settings"]["lengths"]]
    sb = res["state_bytes"]
    parts = [
        f"HyTRec model benchmark ({m['date']}, {m['cpu']}, {threads_phrase(m['threads'])}, torch {m['torch']})",
        "",
        "forward+backward, batch 1, model only (median seconds / peak MB above baseline):",
        *_train_table(res["train_step"], lengths),
        "",
        "forward+backward with full-softmax cross-entropy:",
        *_train_table(res["train_step_loss"], lengths),
        "",
        *_serving_rows(res),
        "",
        f"state bytes per user: float32 {sb['float32']}, float16 {sb['float16']}, bfloat16 {sb['bfloat16']}",
        "",
        *_goal_rows(res),
    ]
    return "\n".join(parts)


def _loss_paragraphs(loss: str | None) -> list[str]:
    """What the "with loss" table computed, as the run recorded it, and whether the trainer has moved on."""
    if loss is None:
        return ["The JSON does not record which implementation of the loss was measured."]
    lines = [f"`{loss}`, " + LOSSES.get(loss, "the loss this page was measured with.")]
    if loss != LOSS:
        lines.append(
            f"The trainer has since moved to `{LOSS}` (blocks of rows, no stored logit matrix), which "
            "`hytrec bench model` now measures: the table below predates the change and overstates the loss's "
            "time and memory; rerun `make bench-model` to refresh it. The change's effect on real training "
            'batches is measured by `hytrec bench train --compare` (`docs/results.md`, "Training cost").'
        )
    return lines


def render_markdown(res: dict[str, Any], plot_rel: str | None) -> str:
    """The page docs/benchmarks/model.md, every figure from ``res``."""
    m, s = res["meta"], res["meta"]["settings"]
    lengths = [str(n) for n in s["lengths"]]
    regenerate = "rerun the command (`make bench-model`) to regenerate this page, its plot and its JSON."
    lines = [*BenchPage.from_meta(m).header(TITLE, regenerate), "## Goals", "", *_goal_rows(res), ""]
    if plot_rel:
        lines += [f"![time and memory against length, serving cost against history]({plot_rel})", ""]
    lines += [
        "## Training step against sequence length",
        "",
        f"One sequence (batch 1) of L events, catalogue of {s['n_items']} items, default configs: HyTRec "
        "d_model 64, 2 TADN heads, 2 TADN blocks, window 64, chunk 64; SASRec d_model 64, 2 layers, 2 heads, "
        "max_len = L. Each point runs in a fresh process forked from a server that has imported torch and "
        "computed nothing: one warm-up run (for the literal loops a 128-event prefix, as they have no size-dependent "
        f"set-up), then up to {s['repeats']} timed runs (fewer once their total passes {s['budget_s']:.0f} s); "
        "the figure is the median. A run is model(...) + loss + backward, gradients cleared before it, no "
        "optimiser step. Memory is the process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus its RSS "
        "before the model was built: model, inputs, activations, gradients and allocator slack (the JSON also "
        "has the absolute peak).",
        "",
        "Series: " + "; ".join(f"**{k}**: {v}" for k, v in SERIES.items() if k in s["series"]) + ".",
        "",
        f"A series stops after a point whose median exceeds {s['budget_s']:.0f} s (the rest: *not run (too "
        "slow)*); nothing is extrapolated. SASRec with dropout > 0 makes PyTorch's CPU SDPA fall back to the "
        f"math kernel, which materialises L x L matrices: points predicted above {s['mem_cap_gb']:.0f} GB "
        f"({MATH_ATTN_FACTOR} fp32 L x L matrices per head and layer, calibrated on a measured point) are "
        "*not run (memory)*. sasrec_flash is the same transformer with dropout 0, where SDPA takes its fused "
        "flash kernel (O(L) memory, still O(L^2) time).",
        "",
        "### Model only (loss = sum of the user vectors)",
        "",
        "Median seconds / peak MB above the process baseline.",
        "",
        *_train_table(res["train_step"], lengths),
        "",
        "Growth of time over the measured range (time ratio for the length ratio; linear = equal): "
        + "; ".join(
            f"{k} {_fmt(v['time_ratio'], '.1f', 'x')} for {v['length_ratio']}x ({v['from_L']} to {v['to_L']})"
            for k, v in res["ratios"]["scaling"].items()
        )
        + ".",
        "",
        "### With the training loss (full-softmax cross-entropy over the catalogue at every position)",
        "",
        *(p for paragraph in _loss_paragraphs(m.get("loss")) for p in (paragraph, "")),
        *_train_table(res["train_step_loss"], lengths),
        "",
        "## Serving: per-event step and per-request cost against history length",
        "",
        "A user's state is built from a random history of H events with `model.build_state` (the parallel "
        f"form); for {s['serve_batch']} users it is that state repeated. Under `torch.inference_mode`, with "
        f"{s.get('serving_threads', s['threads'])} torch thread(s) (the service runs one per worker), "
        "`model.step` applies one event; a request is `user_vector` + scores over the whole catalogue + "
        "top-10. Each figure is the median over 9 rounds of the mean time per call in a block of about 20 ms; "
        "the blocks of all (H, kind) are taken in turn, so a slow spell of the shared machine hits every H "
        "alike. The state has a fixed size, so the step cannot depend on H; the table measures it anyway.",
        "",
        *_serving_rows(res),
        "",
        "## State bytes per user",
        "",
        "`len(encode_state(state, cfg, model_version, dtype))` for the default config (2 layers x 2 heads x "
        "32 x 32 TADN matrices, a 64-float summary, a full ring of 64 (item, timestamp), header, CRC); the "
        "dtype applies to the TADN matrices.",
        "",
        *_state_bytes(res),
        "",
        "## JSON keys",
        "",
        "`hytrec bench model --json` prints one object; `--json-out PATH` (or, by default, the `--markdown` "
        "path with `.json`) writes it; `--from-json PATH` renders the page and plot from it. L and H keys are "
        "strings. Stable keys:",
        "",
        *(f"- `{k}`: {v}" for k, v in JSON_KEYS),
        "",
    ]
    return "\n".join(lines)


def write_markdown(res: dict[str, Any], path: Path, plot: Path | None) -> None:
    """The page at ``path``, linking the plot (when one is drawn) relative to the page."""
    write_text(path, render_markdown(res, os.path.relpath(plot, path.parent) if plot is not None else None))


# ----------------------------------------------------------------------------------------------- plot
def write_plot(res: dict[str, Any], path: Path) -> None:
    """Time and memory against L (log-log) for every series, step and request cost against H.

    Colour is the model, line style what was run; the legends sit under the panels, off the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax_t, ax_m, ax_s) = plt.subplots(1, 3, figsize=(16, 5.8))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.26, wspace=0.22)
    styles = {"train_step": "-", "train_step_loss": "--"}
    for key, style in styles.items():
        for series, row in res[key].items():
            ok = [(int(n), p) for n, p in row.items() if p.get("status") == "ok"]
            if not ok:
                continue
            xs = [n for n, _ in ok]
            kw = {"ls": ":" if series in KERNELS else style, "marker": "o", "ms": 3, "color": COLORS.get(series)}
            ax_t.plot(xs, [p["seconds"] for _, p in ok], **kw)
            ax_m.plot(xs, [max(p["peak_delta_mb"], 1e-1) for _, p in ok], **kw)
    lengths = res["meta"]["settings"]["lengths"]
    for ax, title, ylabel in (
        (ax_t, "forward + backward time, batch 1", "seconds (median)"),
        (ax_m, "peak memory above baseline", "MB (peak RSS)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
        ax.set_xlabel("sequence length L")
        _finish_axes(ax, title, ylabel)
    drawn = [s for s in SERIES if s in res["train_step"]]
    handles = [Line2D([], [], color=COLORS.get(s), marker="o", ms=3, label=s) for s in drawn] + [
        Line2D([], [], color="0.3", ls=ls, label=label)
        for ls, label in (("-", "model only"), ("--", "with loss"), (":", "delta rule alone"))
    ]
    under_left = ((ax_t.get_position().x0 + ax_m.get_position().x1) / 2, 0.12)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=under_left, ncol=5, fontsize=8)

    b = res["meta"]["settings"]["serve_batch"]
    hs = [int(h) for h in res["step_us"]]
    for key, div, label, style, marker in (
        ("step_us", 1, "step, 1 user", "-", "o"),
        ("step_us_batch", b, f"step, {b} users (per user)", "--", "o"),
        ("request_us", 1, "request, 1 user", "-", "s"),
        ("request_us_batch", b, f"request, {b} users (per user)", "--", "s"),
    ):
        ys = [res[key][str(h)] / div for h in hs]
        ax_s.plot(hs, ys, ls=style, marker=marker, ms=4, color=COLORS["hytrec"], label=label)
    ax_s.set_xscale("log")
    ax_s.set_xlabel("history length H behind the state (events)")
    _finish_axes(ax_s, "serving cost against history length (HyTRec)", "microseconds")
    under_right = ((ax_s.get_position().x0 + ax_s.get_position().x1) / 2, 0.12)
    fig.legend(*ax_s.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=under_right, ncol=2, fontsize=8)
    m = res["meta"]
    fig.suptitle(f"HyTRec model benchmark: {m['cpu']}, {threads_phrase(m['threads'])}, torch {m['torch']}, {m['date']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish_axes(ax: Any, title: str, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
