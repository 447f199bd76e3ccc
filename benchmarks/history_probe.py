"""What a trained model gains from events older than its last N: the same checkpoint evaluated with each
history cut to its last N events (``hytrec eval --history-limit``), paired by user against the whole history.

The cut is applied to what the model reads only: the seen items removed from the ranking and the
history-length buckets stay the whole history's, so every row ranks the same targets against the same
candidates. A difference above 0 on users with long histories is accuracy that the older events carry and
the window lacks, for this model; its bootstrap CI says whether the sample shows it.

    nice -n 10 .venv/bin/python -m hytrec.benchmarks.history_probe --model models/ml1m-hytrec \
        --data ../shared/data/ml-1m/interactions.tsv.gz --limits 256,64 --json-out docs/history_probe_ml1m.json
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from hytrec.benchmarks.harness import BenchPage, markdown_table, write_json

# Groups of the protocol's history-length buckets (``training.data.length_buckets``): its first two, then its
# two longest together, the users the long-history goal is about.
GROUPS = (("all", (0, 1, 2, 3)), ("<100", (0,)), ("100-499", (1,)), (">=500", (2, 3)))


def probe(model_dir: Path, data: Path, limits: list[int], resamples: int = 1000) -> dict[str, Any]:
    """Ranks of the test split with the whole history and with each limit; the paired differences."""
    from hytrec.model.checkpoint import load_checkpoint
    from hytrec.training.config import run_tie_seed
    from hytrec.training.data import Interactions, leave_one_out
    from hytrec.training.evaluate import target_ranks_of
    from hytrec.training.metrics import paired_bootstrap, per_user_metrics

    page = BenchPage.start()
    ckpt = load_checkpoint(model_dir)
    test = leave_one_out(Interactions.from_file(data, vocab=ckpt.vocab, tie_seed=run_tie_seed(model_dir))).test
    buckets = test.buckets
    long_users = np.isin(buckets, GROUPS[-1][1])
    per: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    seconds: dict[str, float] = {}
    for limit in [None, *limits]:
        name = "whole" if limit is None else f"last {limit}"
        t0 = time.perf_counter()
        filtered, unfiltered = target_ranks_of(ckpt.model, test, (True, False), history_limit=limit)
        seconds[name] = round(time.perf_counter() - t0, 1)
        per[name] = {"filtered": per_user_metrics(filtered), "unfiltered": per_user_metrics(unfiltered)}
    rows: list[dict[str, Any]] = []
    for protocol in ("filtered", "unfiltered"):
        for group, members in GROUPS:
            m = np.isin(buckets, members)
            if not m.any():  # an empty group (no such users in this data) has no row
                continue
            for metric in ("HR@10", "NDCG@10"):
                whole = per["whole"][protocol][metric][m]
                row = {"protocol": protocol, "group": group, "n": int(m.sum()), "metric": metric}
                row["whole"] = float(whole.mean())
                for limit in limits:
                    cut = per[f"last {limit}"][protocol][metric][m]
                    d, lo, hi = paired_bootstrap(whole, cut, n=resamples)
                    row[f"last {limit}"] = float(cut.mean())
                    row[f"whole - last {limit}"] = [round(d, 4), round(lo, 4), round(hi, 4)]
                rows.append(row)
    return {
        "schema": "hytrec-history-probe/1",
        "vector_change_long_users": vector_change(ckpt.model, test, long_users, limits),
        "gates_long_users": gate_half_lives(ckpt.model, test, long_users),
        "model": str(model_dir),
        "model_version": ckpt.version,
        "model_type": ckpt.model_type,
        "data": str(data),
        "users": len(test),
        "limits": limits,
        "resamples": resamples,
        "seconds": seconds,
        "rows": rows,
        "meta": page.finish().meta(),
    }


def vector_change(model: Any, test: Any, mask: np.ndarray, limits: list[int]) -> dict[str, Any]:
    """How far each cut moves the user vector of the users in ``mask``: ``|u_cut - u_whole| / |u_whole|``
    (median, 90th percentile, max, and the share under 1e-4), one user at a time in the parallel form. A
    model whose state keeps older events moves; one whose gates have forgotten them does not."""
    import torch

    from hytrec.training.evaluate import final_user_vectors

    if not mask.any():
        return {"users": 0}
    change: dict[int, list[float]] = {limit: [] for limit in limits}
    for k in np.flatnonzero(mask).tolist():
        items, times = test.history.sequence(k)
        now = torch.tensor([test.request_ts[k]], dtype=torch.float64)
        vectors = {}
        for limit in [None, *limits]:
            it, ts = (items, times) if limit is None else (items[-limit:], times[-limit:])
            with torch.inference_mode():
                u = final_user_vectors(model, torch.from_numpy(it)[None], torch.from_numpy(ts)[None],
                                       torch.tensor([len(it)]), now)  # fmt: skip
            vectors[limit] = u[0].double()
        for limit in limits:
            change[limit].append(float((vectors[limit] - vectors[None]).norm() / vectors[None].norm()))
    out: dict[str, Any] = {"users": int(mask.sum())}
    for limit, xs in change.items():
        a = np.asarray(xs)
        out[f"last {limit}"] = {"median": float(np.median(a)), "p90": float(np.quantile(a, 0.9)),
                                "max": float(a.max()), "share_below_1e-4": float((a < 1e-4).mean())}  # fmt: skip
    return out


def gate_half_lives(model: Any, test: Any, mask: np.ndarray, max_users: int = 60) -> dict[str, Any]:
    """Per TADN layer and head, over the events of the first ``max_users`` users in ``mask``: the mean decay
    factor exp(g) per event and the half-life in events, ln 0.5 / mean(g) (g the log-decay, time term
    included). It reads g by wrapping each layer's ``project`` for the pass, then restores it."""
    import torch

    from hytrec.model.layers import TADNLayer

    users = np.flatnonzero(mask)[:max_users].tolist()
    layers = [m for m in model.modules() if isinstance(m, TADNLayer)]
    if not users or not layers:
        return {"users": len(users), "layers": []}
    seen: list[list[torch.Tensor]] = [[] for _ in layers]

    def recording(layer: TADNLayer, into: list[torch.Tensor]) -> Any:
        plain = layer.project

        def project(x: torch.Tensor, dt_feature: torch.Tensor) -> Any:
            out = plain(x, dt_feature)
            into.append(out[3].reshape(-1, layer.n_heads).double())
            return out

        return project

    try:
        for layer, into in zip(layers, seen, strict=True):
            layer.project = recording(layer, into)  # an instance attribute shadows the method for this pass
        with torch.inference_mode():
            for k in users:
                items, times = (torch.from_numpy(a)[None] for a in test.history.sequence(k))
                model.build_state(items, times, torch.tensor([items.shape[1]]))
    finally:
        for layer in layers:
            layer.__dict__.pop("project", None)
    out = []
    for g in (torch.cat(x) for x in seen):
        out.append({"mean_decay": g.exp().mean(0).tolist(), "half_life_events": (math.log(0.5) / g.mean(0)).tolist()})
    return {"users": len(users), "layers": out}


def render(res: dict[str, Any]) -> str:
    """One markdown table per protocol: the metric with the whole history, with each cut, and the difference."""
    lines: list[str] = [
        f"`{res['model']}` ({res['model_type']}, {res['model_version']}), {res['users']} test users of "
        f"`{res['data']}`; paired bootstrap over users ({res['resamples']} resamples), 95% CI.",
    ]
    for protocol in ("filtered", "unfiltered"):
        head = ["group", "n", "metric", "whole"]
        for limit in res["limits"]:
            head += [f"last {limit}", f"whole − last {limit} [95% CI]"]
        body = []
        for r in (r for r in res["rows"] if r["protocol"] == protocol):
            cells = [r["group"], f"{r['n']:,}", r["metric"], f"{r['whole']:.4f}"]
            for limit in res["limits"]:
                d, lo, hi = r[f"whole - last {limit}"]
                cells += [f"{r[f'last {limit}']:.4f}", f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"]
            body.append(cells)
        title = "seen items excluded" if protocol == "filtered" else "nothing excluded (repeat-aware)"
        lines += ["", f"**{title}**", "", *markdown_table(head, body, "lrl" + "r" * (len(head) - 3))]
    vc = res.get("vector_change_long_users")
    if vc and vc["users"]:
        rows = [[name, f"{v['median']:.2e}", f"{v['p90']:.2e}", f"{v['max']:.2e}", f"{v['share_below_1e-4']:.0%}"]
                for name, v in vc.items() if name != "users"]  # fmt: skip
        title = f"**User-vector change for the {vc['users']} users with >= 500 events**, |u_cut − u_whole| / |u_whole|:"
        lines += ["", title, "", *markdown_table(["cut", "median", "p90", "max", "under 1e-4"], rows, "lrrrr")]
    gates = res.get("gates_long_users")
    if gates and gates["layers"]:
        joined = [(", ".join(f"{x:.3f}" for x in g["mean_decay"]), ", ".join(f"{x:.1f}" for x in g["half_life_events"]))
                  for g in gates["layers"]]  # fmt: skip
        rows = [[str(i), decay, half] for i, (decay, half) in enumerate(joined)]
        title = f"**TADN gates over the events of {gates['users']} users with >= 500 events** (per head):"
        lines += ["", title, "", *markdown_table(["layer", "mean decay per event", "half-life (events)"], rows, "lll")]
    return "\n".join(lines)


def main(
    model: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    data: Annotated[Path, typer.Option(help="Interactions file; its leave-one-out test split is ranked.")],
    limits: Annotated[str, typer.Option(help="Comma-separated history limits (events).")] = "256,64",
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    json_out: Annotated[Path | None, typer.Option(help="Write the result JSON here.")] = None,
) -> None:
    res = probe(model, data, [int(x) for x in limits.split(",") if x], resamples)
    if json_out is not None:
        write_json(json_out, res)
    typer.echo(render(res))


if __name__ == "__main__":
    typer.run(main)
