"""Results tables from training runs: per-model metrics, per-bucket figures, paired bootstrap CIs, a plot.

Reads run directories written by ``hytrec train`` (``metrics.json``, ``log.jsonl``, ``test_ranks.npy``) and
prints a Markdown report; runs of the same model type are averaged over seeds (mean ± std). Comparisons
pair users: every run of one data file ranks the same test users in the same order.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from hytrec.training.data import BUCKET_LABELS, Interactions, leave_one_out
from hytrec.training.metrics import paired_bootstrap, paired_bootstrap_ratio, per_user_metrics

METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@500", "NDCG@500")


def load_run(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    log_path = run / "log.jsonl"  # absent for a run rebuilt from a published checkpoint
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    return {**metrics, "dir": str(run), "ranks": np.load(run / "test_ranks.npy"), "log": log}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def report(runs: list[Path], baseline: str = "sasrec", candidate: str = "hytrec", plot: Path | None = None) -> str:
    loaded = [load_run(r) for r in runs]
    data_files = {str(Path(r["data"]).resolve()) for r in loaded}  # runs may name one file by different paths
    if len(data_files) != 1:
        raise ValueError(f"runs of one report must share one data file, got {sorted(data_files)}")
    data_file = data_files.pop()
    buckets = leave_one_out(Interactions.from_file(data_file)).test.buckets
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in loaded:
        by_type[r["model_type"]].append(r)

    lines = [f"Data: `{data_file}`; test users: {len(buckets)}; seeds per row in parentheses.", ""]
    lines += ["| model (seeds) | " + " | ".join(METRICS) + " | s / epoch | best epoch / run |"]
    lines += ["|---" * (len(METRICS) + 3) + "|"]
    for model_type, rs in by_type.items():
        cells = [_mean_std([r["test"]["all"][m] for r in rs]) for m in METRICS]
        timed = [np.median([e["train_seconds"] for e in r["log"]]) for r in rs if r["log"]]  # median: robust to pauses
        epoch_s = f"{np.mean(timed):.0f}" if timed else "–"
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in rs)
        lines.append(f"| {model_type} ({len(rs)}) | " + " | ".join(cells) + f" | {epoch_s} | {epochs} |")
    lines += ["", "HR@10 / NDCG@10 by history length of the test prediction:", ""]
    counts = [int((buckets == i).sum()) for i in range(len(BUCKET_LABELS))]
    lines += ["| model | " + " | ".join(f"{b} (n={n})" for b, n in zip(BUCKET_LABELS, counts, strict=True)) + " |"]
    lines += ["|---" * (len(BUCKET_LABELS) + 1) + "|"]
    for model_type, rs in by_type.items():
        cells = []
        for b in BUCKET_LABELS:
            hr = _mean_std([r["test"][b]["HR@10"] for r in rs]) if counts[BUCKET_LABELS.index(b)] else "–"
            nd = _mean_std([r["test"][b]["NDCG@10"] for r in rs]) if counts[BUCKET_LABELS.index(b)] else "–"
            cells.append(f"{hr} / {nd}")
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")

    if baseline in by_type and candidate in by_type:
        lines += [
            "",
            f"Paired bootstrap over users (1000 resamples), {candidate} vs {baseline}, seed-averaged "
            "per-user metrics, 95% CI:",
            "",
        ]
        lines += ["| group | metric | difference [95% CI] | ratio [95% CI] |", "|---|---|---|---|"]
        per = {
            t: {m: np.mean([per_user_metrics(r["ranks"])[m] for r in by_type[t]], axis=0) for m in METRICS[:2]}
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
                lines.append(
                    f"| {name} (n={int(sel.sum())}) | {m} | {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                    f"| {r:.3f} [{rlo:.3f}, {rhi:.3f}] |"
                )
    if plot is not None:
        _plot(by_type, buckets, plot)
        lines += ["", f"![HR@10 by history-length bucket]({plot.name})"]
    return "\n".join(lines)


def _plot(by_type: dict[str, list[dict]], buckets: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(BUCKET_LABELS))
    width = 0.8 / max(len(by_type), 1)
    for i, (model_type, rs) in enumerate(by_type.items()):
        vals = [np.mean([r["test"][b]["HR@10"] for r in rs]) for b in BUCKET_LABELS]
        ax.bar(x + i * width, vals, width, label=model_type)
    counts = [int((buckets == i).sum()) for i in range(len(BUCKET_LABELS))]
    ax.set_xticks(
        x + width * (len(by_type) - 1) / 2, [f"{b}\n(n={n})" for b, n in zip(BUCKET_LABELS, counts, strict=True)]
    )
    ax.set_ylabel("HR@10 (test, seen items excluded)")
    ax.set_xlabel("events in the history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
