"""The long-range comparison table of docs/long_history.md, from the run directories of ``hytrec train``.

Every model is compared with one baseline (recent-softmax by default) on the same test users. The
comparison is a paired bootstrap over users (``training.metrics.paired_bootstrap_ratio`` for the HR@10
ratio, ``paired_bootstrap`` for the difference) on each run's ``test_ranks.npy`` (seen items filtered) and
``test_ranks_unfiltered.npy`` (nothing filtered). It reads files only, so a table can be redrawn without
training again::

    python -m hytrec.benchmarks.long_history_report RUN_DIR... [--baseline recent-softmax] [--json OUT]
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
            _ci(r["ratio filtered"]),
            _ci(r["diff filtered"], signed=True),
            _ci(r["ratio unfiltered"]),
        ]
        for r in rows
    ]
    return "\n".join(markdown_table(header, body, "llrrrrlll"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of one data file")
    parser.add_argument("--baseline", default="recent-softmax", help="model type compared against")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = compare([load_run(p) for p in args.runs], args.baseline, n=args.resamples, seed=args.seed)
    print(render(rows, args.baseline))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
