"""The results figures (training/report.py): fixed colours, seed error bars, no empty buckets, legend clear.

Run directories are built directly (``metrics.json`` + ``test_ranks.npy``, what ``hytrec results`` reads) with
metrics computed from the ranks, so no training is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from typer.testing import CliRunner

from hytrec.cli import app
from hytrec.model.checkpoint import MODEL_TYPES
from hytrec.training.data import BUCKET_LABELS, Interactions, leave_one_out
from hytrec.training.metrics import per_user_metrics, summarize
from hytrec.training.report import (
    MODEL_COLOURS,
    BucketBars,
    bucket_figure,
    load_run,
    parse_bucket_tables,
    redraw_page_figures,
    report,
)
from hytrec.training.synth import SynthConfig, generate, write_interactions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """hytrec with 2 seeds, sasrec with 1, on a log whose users all have < 500 events (two empty buckets)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "log.tsv"
    write_interactions(generate(SynthConfig(n_users=40, n_items=60, events_per_user="20:300", seed=1)), data)
    buckets = leave_one_out(Interactions.from_file(data)).test.buckets
    assert set(np.unique(buckets)) == {0, 1}
    rng = np.random.default_rng(0)
    dirs = []
    for model_type, seed in (("hytrec", 0), ("hytrec", 1), ("sasrec", 0)):
        run = root / f"{model_type}-s{seed}"
        run.mkdir()
        ranks = rng.integers(0, 30, size=len(buckets))
        summary = summarize(per_user_metrics(ranks), buckets)
        metrics = {"model_type": model_type, "data": str(data), "seed": seed, "best_epoch": 1, "epochs_run": 1}
        (run / "metrics.json").write_text(json.dumps({**metrics, "test": summary}))
        np.save(run / "test_ranks.npy", ranks)
        dirs.append(run)
    return dirs


def _bars(fig) -> dict[str, BarContainer]:
    ax = fig.axes[0]
    return {c.get_label().split()[0]: c for c in ax.containers if isinstance(c, BarContainer)}


def _tick_labels(fig) -> list[str]:
    return [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()]


def test_every_model_type_has_its_own_colour() -> None:
    assert set(MODEL_TYPES) <= set(MODEL_COLOURS)
    assert len(set(MODEL_COLOURS.values())) == len(MODEL_COLOURS)


def test_a_model_keeps_its_colour_across_figures() -> None:
    def bars(*models: str) -> list[BucketBars]:
        return [BucketBars(m, 1, (0.3, 0.2, 0.1, 0.1), None) for m in models]

    counts = [5, 5, 5, 5]
    figs = [
        bucket_figure(bars("hytrec", "sasrec"), counts),
        bucket_figure(bars("sasrec", "recent-softmax", "hytrec"), counts),
        bucket_figure(bars("tadn-only", "hytrec-notime", "hytrec"), counts),
    ]
    seen: dict[str, set[tuple[float, ...]]] = {}
    for fig in figs:
        for model, container in _bars(fig).items():
            for patch in container.patches:
                seen.setdefault(model, set()).add(tuple(np.round(patch.get_facecolor(), 6)))
    assert all(len(colours) == 1 for colours in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == len(seen)  # and different models differ


def test_error_bars_are_the_std_over_seeds(runs: list[Path]) -> None:
    by_type = {"hytrec": [load_run(r) for r in runs[:2]], "sasrec": [load_run(runs[2])]}
    from hytrec.training.report import bars_from_runs

    bars = bars_from_runs(by_type)
    fig = bucket_figure(bars, [10, 10, 0, 0])
    containers = _bars(fig)
    assert containers["sasrec"].errorbar is None  # one seed: no whisker
    whiskers = containers["hytrec"].errorbar
    assert whiskers is not None
    lengths = [float(np.ptp(seg[:, 1])) for seg in whiskers.lines[2][0].get_segments()]
    expected = [2 * np.std([r["test"][b]["HR@10"] for r in by_type["hytrec"]], ddof=1) for b in BUCKET_LABELS[:2]]
    assert lengths == pytest.approx(expected)
    heights = [p.get_height() for p in containers["hytrec"].patches]
    assert heights == pytest.approx(
        [np.mean([r["test"][b]["HR@10"] for r in by_type["hytrec"]]) for b in BUCKET_LABELS[:2]]
    )


def test_empty_buckets_are_left_out() -> None:
    bars = [BucketBars("hytrec", 1, (0.3, float("nan"), 0.2, float("nan")), None)]
    fig = bucket_figure(bars, [12, 0, 3, 0])
    assert _tick_labels(fig) == ["<100", "500-999"]
    assert len(_bars(fig)["hytrec"].patches) == 2
    with pytest.raises(ValueError):
        bucket_figure(bars, [0, 0, 0, 0])


def test_legend_does_not_cover_the_bars() -> None:
    bars = [BucketBars(m, 3, (0.9, 0.9, 0.9, 0.9), (0.05,) * 4) for m in MODEL_COLOURS]  # bars up to the top
    fig = bucket_figure(bars, [1, 1, 1, 1], title="a title")
    fig.draw_without_rendering()  # runs the layout engine, as savefig does
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.y0 >= ax.get_window_extent().y1  # above the axes, so above every bar
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)  # not cut off


def test_report_plots_and_the_page_redraws_the_same_figure(runs: list[Path], tmp_path: Path) -> None:
    """A page's figure redrawn from its own bucket table has the heights, whiskers and buckets of the runs'."""
    png = tmp_path / "buckets.png"
    text = report(runs, plot=png)
    assert png.stat().st_size > 1000 and "![HR@10 by history-length bucket](buckets.png)" in text
    page = tmp_path / "page.md"
    page.write_text("# Results\n\n## Synthetic\n\n" + text + "\n")
    [found] = parse_bucket_tables(page.read_text())
    assert found.image == "buckets.png" and found.heading == "Synthetic" and found.counts[2:] == [0, 0]
    by_model = {b.model: b for b in found.bars}
    assert by_model["hytrec"].seeds == 2 and by_model["sasrec"].seeds == 1 and by_model["sasrec"].std is None
    from hytrec.training.report import bars_from_runs

    direct = {b.model: b for b in bars_from_runs({"hytrec": [load_run(r) for r in runs[:2]]})}
    assert by_model["hytrec"].mean[:2] == pytest.approx(direct["hytrec"].mean[:2], abs=5e-5)  # 4 decimals
    assert by_model["hytrec"].std[:2] == pytest.approx(direct["hytrec"].std[:2], abs=5e-5)
    png.unlink()
    assert redraw_page_figures(page) == [png] and png.stat().st_size > 1000
    res = CliRunner().invoke(app, ["results", "--from-page", str(page)])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(app, ["results"]).exit_code != 0  # neither runs nor --from-page


def test_the_results_page_figures_can_be_redrawn_from_its_tables() -> None:
    """docs/results.md keeps a bucket table above each PNG it shows (its figures are drawn from them)."""
    page = REPO / "docs" / "results.md"
    found = {f.image: f for f in parse_bucket_tables(page.read_text())}
    assert set(found) == {"results_ml1m.png", "results_ml1m_ablation.png", "results_beauty.png"}
    assert all((page.parent / image).exists() for image in found)
    ml1m = {b.model: b for b in found["results_ml1m.png"].bars}
    assert set(ml1m) == {"hytrec", "sasrec"} and all(b.seeds == 3 and b.std is not None for b in ml1m.values())
    assert found["results_beauty.png"].counts[2:] == [0, 0]


def test_the_repeat_aware_protocol_gets_its_own_comparison_when_every_run_has_it(runs: list[Path], tmp_path) -> None:
    """`test_ranks_unfiltered.npy` in every compared run adds a second bootstrap table, from those ranks."""
    import shutil

    text = report(runs)
    assert "per-user metrics, 95% CI:" in text and "repeat-aware" not in text  # no run has the file yet
    copies = []
    for run in runs:
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        ranks = np.load(run / "test_ranks.npy")
        # the candidate hits every user's target at rank 0 unfiltered; the baseline never does
        np.save(copy / "test_ranks_unfiltered.npy", np.zeros_like(ranks) if "hytrec" in run.name else ranks + 100)
        copies.append(copy)
    text = report(copies)
    filtered, unfiltered = text.split("nothing excluded (repeat-aware):")
    row = next(line for line in unfiltered.splitlines() if line.startswith("| all (") and "HR@10" in line)
    assert "| +1.0000 [+1.0000, +1.0000] |" in row
    assert "| +1.0000 [" not in filtered  # the filtered table still reads test_ranks.npy
