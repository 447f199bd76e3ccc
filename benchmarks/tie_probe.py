"""How much a checkpoint's test figures lean on the order of events that share a timestamp.

Leave-one-out makes each user's last event the test target. When the user's last second holds several
events, the tie order decides which of them is last: file order, or the seeded permutation of
``--tie-seed``. The probe ranks the test split of each order with one checkpoint and splits the users by
whether the test event shares its second with the event before it. That split does not depend on the order
(the last second has two events or more). For users without such a tie the target is the same event in every
order, so their rows pair exactly and get a bootstrap CI. For tied users the target differs between orders,
so only the means are compared.

    nice -n 10 .venv/bin/python -m hytrec.benchmarks.tie_probe --model models/ml1m-hytrec \
        --model models/ml1m-sasrec --data ../shared/data/ml-1m/interactions.tsv.gz --tie-seeds 0,1 \
        --json-out docs/tie_probe_ml1m.json
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from hytrec.benchmarks.harness import BenchPage, markdown_table, write_json


def order_name(tie_seed: int | None) -> str:
    return "file" if tie_seed is None else f"random, seed {tie_seed}"


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")  # an empty group: no figure, not a warning


def tied_to_previous(test: Any) -> np.ndarray:
    """Per test user: does the test event share its timestamp with the history's last event?"""
    h = test.history
    return test.request_ts == h.timestamps[h.offsets[1:] - 1]


def probe_model(model_dir: Path, data: Path, tie_seeds: list[int], resamples: int = 1000) -> dict[str, Any]:
    """One checkpoint's test metrics under file order and each tie seed, overall, tied and not tied."""
    from hytrec.model.checkpoint import load_checkpoint
    from hytrec.training.config import run_tie_seed
    from hytrec.training.data import Interactions, leave_one_out
    from hytrec.training.evaluate import target_ranks_of
    from hytrec.training.metrics import paired_bootstrap, per_user_metrics

    ckpt = load_checkpoint(model_dir)
    orders: dict[str, dict[str, Any]] = {}
    tied: np.ndarray | None = None
    for seed in [None, *tie_seeds]:
        test = leave_one_out(Interactions.from_file(data, vocab=ckpt.vocab, tie_seed=seed)).test
        this_tied = tied_to_previous(test)
        if tied is not None and not np.array_equal(tied, this_tied):  # an order-free property, or a bug
            raise AssertionError("which test events tie with their predecessor changed with the tie order")
        tied = this_tied
        filtered, unfiltered = target_ranks_of(ckpt.model, test, (True, False))
        orders[order_name(seed)] = {"filtered": per_user_metrics(filtered), "unfiltered": per_user_metrics(unfiltered)}
    assert tied is not None
    rows = []
    for name, per in orders.items():
        hr, nd = per["filtered"]["HR@10"], per["filtered"]["NDCG@10"]
        row = {
            "test order": name,
            "HR@10": float(hr.mean()),
            "NDCG@10": float(nd.mean()),
            "HR@10 tied": _mean(hr[tied]),
            "HR@10 not tied": _mean(hr[~tied]),
            "HR@10 unfiltered": float(per["unfiltered"]["HR@10"].mean()),
        }
        if name != "file" and (~tied).any():  # not-tied users rank the same target in both orders: a paired difference
            file_hr = orders["file"]["filtered"]["HR@10"]
            d, lo, hi = paired_bootstrap(file_hr[~tied], hr[~tied], n=resamples)
            row["not tied, file − this"] = [d, lo, hi]
        rows.append(row)
    return {
        "model": str(model_dir),
        "model_version": ckpt.version,
        "trained on": order_name(run_tie_seed(model_dir)),
        "users": int(len(tied)),
        "tied users": int(tied.sum()),
        "rows": rows,
    }


def _cell(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.4f}"


def render(res: dict[str, Any]) -> str:
    lines = [f"Test split of `{res['data']}`; seen items excluded unless a column says otherwise.", ""]
    headers = ["checkpoint (trained on)", "test order", "HR@10", "NDCG@10", "HR@10 tied", "HR@10 not tied"]
    headers += ["not tied: file − this [95% CI]", "HR@10 nothing excluded"]
    table = []
    for m in res["models"]:
        for row in m["rows"]:
            ci = row.get("not tied, file − this")
            table.append(
                [
                    f"`{m['model']}` ({m['trained on']})",
                    row["test order"],
                    f"{row['HR@10']:.4f}",
                    f"{row['NDCG@10']:.4f}",
                    _cell(row["HR@10 tied"]),
                    _cell(row["HR@10 not tied"]),
                    "–" if ci is None else f"{ci[0]:+.4f} [{ci[1]:+.4f}, {ci[2]:+.4f}]",
                    f"{row['HR@10 unfiltered']:.4f}",
                ]
            )
    lines += markdown_table(headers, table, "llrrrrrr")
    m0 = res["models"][0]
    share = f"{m0['tied users']:,} of {m0['users']:,}"
    lines += ["", f"Tied: the {share} test events that share their second with the event before them."]
    return "\n".join(lines)


def main(
    model: Annotated[list[Path], typer.Option(help="Checkpoint directory (repeat for several).")],
    data: Annotated[Path, typer.Option(help="Interactions file; its leave-one-out test split is ranked.")],
    tie_seeds: Annotated[str, typer.Option(help="Comma-separated tie seeds to test under, beside file order.")] = "0,1",
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    json_out: Annotated[Path | None, typer.Option(help="Write the result JSON here.")] = None,
) -> None:
    page = BenchPage.start()
    seeds = [int(x) for x in tie_seeds.split(",") if x]
    res = {"data": str(data), "models": [probe_model(m, data, seeds, resamples) for m in model]}
    res["meta"] = page.finish().meta()
    if json_out is not None:
        write_json(json_out, res)
    typer.echo(render(res))


if __name__ == "__main__":
    typer.run(main)
