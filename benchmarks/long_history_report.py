"""The long-range comparison table of docs/long_history.md, from the run directories of ``hytrec train``.

Every model is compared with one baseline (recent-softmax by default) on the same test users. The
comparison is a paired bootstrap over users (``training.metrics.paired_bootstrap_ratio`` for the HR@10
ratio, ``paired_bootstrap`` for the difference) on each run's ``test_ranks.npy`` (seen items filtered) and
``test_ranks_unfiltered.npy`` (nothing filtered). It reads files only, so a table can be redrawn without
training again::

    python -m hytrec.benchmarks.long_history_report RUN_DIR... [--baseline recent-softmax]
        [--json OUT --gap GAP --label TEXT]
    python -m hytrec.benchmarks.long_history_report --plot OUT.png TABLE.json...

``--json`` keeps the rows with the scenario's gap and a label; ``--plot`` draws, from such files, each model's
HR@10 ratio to the baseline with its CI against the gap, one panel per protocol.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hytrec.benchmarks.harness import markdown_table
from hytrec.training.metrics import paired_bootstrap, paired_bootstrap_ratio, per_user_metrics

PROTOCOLS = {"filtered": "test_ranks.npy", "unfiltered": "test_ranks_unfiltered.npy"}


@dataclass
class Run:
    """One ``hytrec train`` output directory: what the table needs from it."""

    path: Path
    model_type: str
    label: str  # model type, with the layer count when it differs from the default
    best_epoch: int
    epochs_run: int
    epochs_planned: int
    train_seconds: float  # sum over the epochs run (log.jsonl), validation excluded
    ranks: dict[str, np.ndarray]  # protocol -> per-user 0-based target ranks, in test-user order


def load_run(path: Path) -> Run:
    """Read a finished run (``metrics.json`` and both rank files must be there)."""
    metrics = json.loads((path / "metrics.json").read_text())
    config = json.loads((path / "train_config.json").read_text())
    log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines() if line.strip()]
    label = metrics["model_type"]
    if label == "hytrec-hybrid":
        label += f" ({config['n_layers']} TADN + window)"
    return Run(
        path=path,
        model_type=metrics["model_type"],
        label=label,
        best_epoch=int(metrics["best_epoch"]),
        epochs_run=int(metrics["epochs_run"]),
        epochs_planned=int(config["epochs"]),
        train_seconds=float(sum(r["train_seconds"] for r in log)),
        ranks={p: np.load(path / f) for p, f in PROTOCOLS.items()},
    )


def compare(runs: list[Run], baseline: str, n: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per run: HR@10 / NDCG@10 per protocol and, against the baseline run, the HR@10 ratio and
    difference with their paired bootstrap 95% CIs (``None`` on the baseline's own row)."""
    base = [r for r in runs if r.model_type == baseline]
    if len(base) != 1:
        raise ValueError(f"need exactly one {baseline} run, got {len(base)}")
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "model": run.label,
            "path": str(run.path),
            "best_epoch": run.best_epoch,
            "epochs_run": run.epochs_run,
            "epochs_planned": run.epochs_planned,
            "train_seconds": round(run.train_seconds, 1),
            "users": len(run.ranks["filtered"]),
        }
        for protocol, ranks in run.ranks.items():
            ref = base[0].ranks[protocol]
            if ranks.shape != ref.shape:
                raise ValueError(f"{run.path}: {len(ranks)} test users, the baseline has {len(ref)}")
            hr, hr_ref = per_user_metrics(ranks)["HR@10"], per_user_metrics(ref)["HR@10"]
            row[f"HR@10 {protocol}"] = float(hr.mean())
            row[f"NDCG@10 {protocol}"] = float(per_user_metrics(ranks)["NDCG@10"].mean())
            is_base = run is base[0]
            row[f"baseline hits {protocol}"] = int(hr_ref.sum())
            row[f"ratio {protocol}"] = None if is_base else paired_bootstrap_ratio(hr, hr_ref, n=n, seed=seed)
            row[f"diff {protocol}"] = None if is_base else paired_bootstrap(hr, hr_ref, n=n, seed=seed)
        rows.append(row)
    return rows


def _ci(x: tuple[float, float, float] | None, signed: bool = False) -> str:
    if x is None:
        return "–"

    def f(v: float) -> str:
        if math.isinf(v):
            return "inf"
        return f"{v:+.4f}".replace("-", "−") if signed else f"{v:.3f}"

    return f"{f(x[0])} [{f(x[1])}, {f(x[2])}]"


def _ratio(row: dict[str, Any], protocol: str) -> str:
    if row[f"ratio {protocol}"] is not None and not row[f"baseline hits {protocol}"]:
        return "undefined (the baseline has no hit)"
    return _ci(row[f"ratio {protocol}"])


def render(rows: list[dict[str, Any]], baseline: str) -> str:
    """The Markdown table of the page."""
    header = [
        "model",
        "best/run (planned)",
        "train s",
        "HR@10 filtered",
        "NDCG@10 filt.",
        "HR@10 unfiltered",
        f"HR@10 ratio vs {baseline}, filtered [95% CI]",
        "HR@10 diff, filtered [95% CI]",
        "HR@10 ratio, unfiltered [95% CI]",
    ]
    body = [
        [
            r["model"],
            f"{r['best_epoch']}/{r['epochs_run']} ({r['epochs_planned']})",
            f"{r['train_seconds']:,.0f}",
            f"{r['HR@10 filtered']:.4f}",
            f"{r['NDCG@10 filtered']:.4f}",
            f"{r['HR@10 unfiltered']:.4f}",
            _ratio(r, "filtered"),
            _ci(r["diff filtered"], signed=True),
            _ratio(r, "unfiltered"),
        ]
        for r in rows
    ]
    return "\n".join(markdown_table(header, body, "llrrrrlll"))


def write_plot(tables: list[dict[str, Any]], path: Path, goal: float = 1.15, cap: float = 6.0) -> None:
    """Ratio to the baseline against the gap (log x), filtered and unfiltered panels; whiskers: the 95% CIs
    (an infinite upper bound is drawn to ``cap`` with an arrow head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    models = sorted({r["model"] for t in tables for r in t["rows"] if r["ratio filtered"] is not None})
    colors = dict(zip(models, ["tab:blue", "tab:green", "black", "tab:purple", "tab:red"], strict=False))
    drawn = dict.fromkeys(PROTOCOLS, 0)
    for ax, protocol, title in zip(axes, PROTOCOLS, ("seen items filtered", "nothing filtered"), strict=True):
        for k, model in enumerate(models):
            for t in tables:
                for r in t["rows"]:
                    ci = r[f"ratio {protocol}"]
                    if r["model"] != model or ci is None or any(math.isnan(v) for v in ci):
                        continue
                    if r.get(f"baseline hits {protocol}", 1) == 0:  # x / 0: no ratio to draw
                        continue
                    drawn[protocol] += 1
                    x = t["gap"] * 1.08 ** (k - (len(models) - 1) / 2)  # side by side at one gap
                    y, lo, hi = (min(v, cap) for v in ci)
                    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=4, color=colors[model])
                    if math.isinf(ci[2]):
                        ax.annotate("", (x, cap), (x, cap * 0.9), arrowprops={"arrowstyle": "->"})
            ax.plot([], [], "o", color=colors[model], label=model)
        if not drawn[protocol]:
            ax.text(
                0.5,
                0.5,
                "no ratio: the baseline has no hit\nor it was not computed",
                ha="center",
                transform=ax.transAxes,
                fontsize=9,
                color="0.3",
            )
        ax.axhline(1.0, color="0.5", lw=1)
        ax.axhline(goal, color="0.5", lw=1, ls="--")
        ax.set_xscale("log")
        gaps = sorted({t["gap"] for t in tables})
        ax.set_xticks(gaps, [f"{g:,}" for g in gaps])
        ax.set_xlim(min(gaps) / 2, max(gaps) * 2)
        ax.set_xlabel("dormancy gap (events)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("HR@10 / recent-softmax HR@10")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "; ".join(f"gap {t['gap']:,}: {t['label']}" for t in tables) + f" (dashed: the {goal}x goal)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories of one data file (or, with --plot, tables)")
    parser.add_argument("--baseline", default="recent-softmax", help="model type compared against")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON, with --gap and --label")
    parser.add_argument("--gap", type=int, help="the scenario's dormancy gap (events), kept in the JSON")
    parser.add_argument("--label", default="", help="what the runs were (scenario, users, seed), kept in the JSON")
    parser.add_argument("--plot", type=Path, help="draw the ratios of the JSON tables given as arguments")
    args = parser.parse_args(argv)
    if args.plot:
        write_plot([json.loads(p.read_text()) for p in args.runs], args.plot)
        return
    if not args.runs:
        parser.error("give run directories")
    rows = compare([load_run(p) for p in args.runs], args.baseline, n=args.resamples, seed=args.seed)
    print(render(rows, args.baseline))
    if args.json:
        table = {"gap": args.gap, "label": args.label, "baseline": args.baseline, "resamples": args.resamples}
        args.json.write_text(json.dumps({**table, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
