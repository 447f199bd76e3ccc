"""Training-side commands registered by ``hytrec/cli.py``: synth, train, eval and recommend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def synth(
    out: Annotated[Path, typer.Option("--out", help="Output file; gzip when it ends in .gz.")],
    users: Annotated[int, typer.Option("--users", help="Number of users.")] = 1000,
    items: Annotated[int, typer.Option("--items", help="Number of items.")] = 5000,
    events_per_user: Annotated[
        str,
        typer.Option("--events-per-user", help="N, MIN:MAX (uniform) or lognormal:MEAN[:SIGMA]."),
    ] = "200",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same file).")] = 0,
    start_time: Annotated[int, typer.Option("--start-time", help="Earliest timestamp (unix s).")] = 1_600_000_000,
    genres: Annotated[int, typer.Option("--genres", help="Number of latent item genres.")] = 20,
    write_item_table: Annotated[
        bool, typer.Option("--items-table/--no-items-table", help="Also write an item table beside --out.")
    ] = True,
) -> None:
    """Write a synthetic interaction log (user_id, item_id, timestamp) with long-term tastes and sessions."""
    from hytrec.training.synth import SynthConfig, generate, items_path_for, write_interactions, write_items

    t0 = time.perf_counter()
    cfg = SynthConfig(
        n_users=users,
        n_items=items,
        events_per_user=events_per_user,
        seed=seed,
        start_time=start_time,
        n_genres=genres,
    )
    try:
        log = generate(cfg)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    write_interactions(log, out)
    msg = f"wrote {len(log):,} events ({users:,} users, {items:,} items) to {out}"
    if write_item_table:
        item_path = items_path_for(out)
        write_items(log, item_path)
        msg += f" and {item_path}"
    typer.echo(f"{msg} in {time.perf_counter() - t0:.1f}s")


def train(
    data: Annotated[Path, typer.Option("--data", help="Interactions file (user_id item_id timestamp).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    model_type: Annotated[
        str, typer.Option("--model-type", help="hytrec | hytrec-notime | tadn-only | recent-softmax | sasrec")
    ] = "hytrec",
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 200,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better val NDCG@10.")] = 10,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    batch_tokens: Annotated[int, typer.Option(help="Events per batch.")] = 32768,
    max_len: Annotated[int | None, typer.Option(help="Latest events a model reads (SASRec default 200).")] = None,
    d_model: Annotated[int, typer.Option(help="Model width.")] = 64,
    n_layers: Annotated[int, typer.Option(help="TADN blocks (HyTRec) or transformer blocks (SASRec).")] = 2,
    n_heads: Annotated[int, typer.Option(help="Attention / TADN heads.")] = 2,
    window: Annotated[int, typer.Option(help="K: events of the short branch and the ring buffer.")] = 64,
    dropout: Annotated[float, typer.Option(help="Dropout.")] = 0.2,
    state_dtype: Annotated[str, typer.Option(help="Serving state storage: float32 | float16 | bfloat16.")] = "float32",
    loss: Annotated[str, typer.Option(help="full | sampled (logQ-corrected sampled softmax).")] = "full",
    negatives: Annotated[int, typer.Option(help="Negatives per batch for the sampled softmax.")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    threads: Annotated[int, typer.Option(help="Torch threads (0: default).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/train_state.*.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train a model on the leave-one-out split of DATA; writes a checkpoint, log.jsonl and metrics.json."""
    import json

    from hytrec.training.train import TrainConfig
    from hytrec.training.train import train as run_training

    try:
        cfg = TrainConfig(
            model_type=model_type,
            epochs=epochs,
            patience=patience,
            lr=lr,
            weight_decay=weight_decay,
            batch_tokens=batch_tokens,
            max_len=max_len,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            window=window,
            dropout=dropout,
            state_dtype=state_dtype,
            loss=loss,
            negatives=negatives,
            seed=seed,
            threads=threads,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_training(data, out, cfg, resume=resume, quiet=quiet)
    typer.echo(json.dumps({k: result[k] for k in ("model_version", "best_epoch", "test")}, indent=2))


def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint directory.")],
    data: Annotated[Path, typer.Option("--data", help="Interactions file; evaluated on its leave-one-out test split.")],
    split: Annotated[str, typer.Option(help="test | valid")] = "test",
    request_time: Annotated[
        str,
        typer.Option(
            help="target: the held-out event's timestamp (the protocol) | last-event: the history's latest "
            "timestamp (a probe: how much the model leans on knowing the request time)"
        ),
    ] = "target",
    stream_state: Annotated[
        str | None,
        typer.Option(
            help="HyTRec only: build each history's state through the serving recurrence, one event at a "
            "time, storing the state as float32 | float16 | bfloat16 after every event (default: parallel form)"
        ),
    ] = None,
    save_ranks: Annotated[
        Path | None,
        typer.Option(help="Write the target ranks (seen items excluded) as .npy, like a training run's test_ranks.npy"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Full-ranking HR/NDCG@10/50/500, overall and per history-length bucket (seen items excluded and not)."""
    import dataclasses
    import json

    from hytrec.model.checkpoint import load_checkpoint
    from hytrec.model.config import STATE_DTYPES
    from hytrec.training.data import Interactions, ItemVocab, leave_one_out
    from hytrec.training.evaluate import evaluate_both

    t0 = time.perf_counter()
    ckpt = load_checkpoint(model)
    interactions = Interactions.from_file(data, vocab=ItemVocab(ckpt.item_ids))
    eval_set = getattr(leave_one_out(interactions), split)
    if request_time == "last-event":
        h = eval_set.history
        eval_set = dataclasses.replace(eval_set, request_ts=h.timestamps[h.offsets[1:] - 1].copy())
    elif request_time != "target":
        raise typer.BadParameter("must be 'target' or 'last-event'", param_hint="--request-time")
    if stream_state is not None and (ckpt.model_type == "sasrec" or stream_state not in STATE_DTYPES):
        raise typer.BadParameter(f"needs a HyTRec model and one of {tuple(STATE_DTYPES)}", param_hint="--stream-state")
    filtered, unfiltered = evaluate_both(ckpt.model, eval_set, stream_dtype=stream_state)
    if save_ranks is not None:
        import numpy as np

        np.save(save_ranks, filtered.ranks)
    result = {
        "model_version": ckpt.version,
        "split": split,
        "request_time": request_time,
        "state": f"streamed, stored as {stream_state}" if stream_state else "parallel form",
        "users": len(eval_set),
        "seconds": round(time.perf_counter() - t0, 2),
        "metrics": filtered.summary,
        "metrics_unfiltered": unfiltered.summary,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"{ckpt.version} on {data} ({split}, {len(eval_set)} users, {result['state']}, {result['seconds']} s); "
        "seen items excluded:"
    )
    typer.echo(format_summary(filtered.summary))


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    keys = [k for k in next(iter(summary.values())) if k != "n"]
    lines = [f"{'bucket':>10} {'n':>6} " + " ".join(f"{k:>9}" for k in keys)]
    for bucket, row in summary.items():
        lines.append(f"{bucket:>10} {row['n']:>6} " + " ".join(f"{row[k]:>9.4f}" for k in keys))
    return "\n".join(lines)


def recommend(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint directory.")],
    history: Annotated[Path, typer.Option("--history", help="Interactions file holding the user's events.")],
    user: Annotated[str, typer.Option("--user", help="User id in the history file.")],
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
    at: Annotated[float | None, typer.Option("--at", help="Request time (unix s); default: the last event's.")] = None,
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen/--include-seen", help="Drop the last K items.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Top-K for one user from their full history, with the parallel form (the service's reference)."""
    import json

    import numpy as np

    from hytrec.model.serving import ServingModel
    from hytrec.training.data import read_events

    users, items, times = read_events(history)
    mine = users == user
    if not mine.any():
        raise typer.BadParameter(f"user {user!r} has no events in {history}", param_hint="--user")
    items, times = items[mine], times[mine]
    order = np.argsort(times, kind="stable")
    serving = ServingModel.load(model)
    rows = [serving.row(str(i)) for i in items[order]]
    state = serving.build(rows, times[order].tolist())
    now = float(times.max()) if at is None else at
    rec = serving.recommend(state, [now], k, [exclude_seen])[0]
    result = {
        "user_id": user,
        "model_version": serving.version,
        "history_length": len(rows),
        "request_time": now,
        "items": [{"item_id": i, "score": s} for i, s in zip(rec.item_ids, rec.scores, strict=True)],
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"user {user}: {len(rows)} events, model {serving.version}, at {now}")
    for rank, (i, s) in enumerate(zip(rec.item_ids, rec.scores, strict=True), start=1):
        typer.echo(f"{rank:>3}. {i}  {s:.4f}")


def results(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `hytrec train` (one data file).")],
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of HR@10 per history-length bucket.")] = None,
    baseline: Annotated[str, typer.Option(help="Model type compared against.")] = "sasrec",
    candidate: Annotated[str, typer.Option(help="Model type compared.")] = "hytrec",
) -> None:
    """Markdown tables of finished runs: metrics (mean ± std over seeds), buckets, paired bootstrap CIs."""
    from hytrec.training.report import report

    try:
        typer.echo(report(runs, baseline=baseline, candidate=candidate, plot=plot))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="RUNS") from exc
