"""Training-side commands registered by ``hytrec/cli.py``: synth, train, eval, recommend and results.

Options are ``Annotated[type, typer.Option(...)]`` throughout; choices are enums, so typer rejects a bad
value and ``--help`` lists the good ones. ``train``'s options come from :class:`TrainConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import typing
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hytrec.training.config import ModelType, StateDtype, TrainConfig, run_tie_seed

_F = TypeVar("_F", bound=Callable[..., Any])


class Split(StrEnum):
    TEST = "test"
    VALID = "valid"


class Scenario(StrEnum):
    """``hytrec synth --scenario``: the default generator, or a planted long-range scenario (training/synth.py)."""

    NONE = "none"
    DORMANT = "dormant"
    PERIODIC = "periodic"
    RECONSUME = "reconsume"


class RequestTime(StrEnum):
    TARGET = "target"
    LAST_EVENT = "last-event"


def config_options(config_cls: type) -> Callable[[_F], _F]:
    """Give a command one ``--field-name`` option per field of the dataclass ``config_cls``.

    Type, default and help (``metadata["help"]``) come from the field, so the dataclass stays the one
    source of the configuration; the command receives the values as ``**kwargs`` and builds the dataclass.
    Fields with ``metadata["cli"] = False`` are left out. The options go after the command's own
    parameters without a default and before those with one.
    """
    hints = typing.get_type_hints(config_cls, include_extras=True)
    added = []
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{config_cls.__name__}.{f.name} needs metadata['help'] (its --help text)")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        option = typer.Option(f"--{f.name.replace('_', '-')}", help=f.metadata["help"])
        added.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hints[f.name], option]
            )
        )

    def decorate(func: _F) -> _F:
        sig = inspect.signature(func, eval_str=True)  # typer reads __signature__ as is: no string annotations
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        clash = {p.name for p in own} & {p.name for p in added}
        if clash:
            raise TypeError(f"{func.__name__} already has parameters {sorted(clash)}")
        required = [p for p in own if p.default is p.empty]
        optional = [p for p in own if p.default is not p.empty]
        func.__signature__ = sig.replace(parameters=[*required, *added, *optional])  # type: ignore[attr-defined]
        return func

    return decorate


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
    scenario: Annotated[
        Scenario,
        typer.Option(
            "--scenario",
            help="none: the default generator | dormant / periodic / reconsume: a planted interest that returns "
            "--gap events after its last burst (docs/long_history.md; --events-per-user is then not used)",
        ),
    ] = Scenario.NONE,
    gap: Annotated[int, typer.Option("--gap", help="Scenarios: background events between planted bursts.")] = 1000,
    returns: Annotated[
        int, typer.Option("--returns", help="Scenarios: planted returns before the test event's return.")
    ] = 2,
) -> None:
    """Write a synthetic interaction log (user_id, item_id, timestamp) with long-term tastes and sessions."""
    from hytrec.training.synth import (
        LongRangeConfig,
        SynthConfig,
        generate,
        generate_long_range,
        items_path_for,
        write_interactions,
        write_items,
    )

    t0 = time.perf_counter()
    try:
        if scenario is Scenario.NONE:
            cfg = SynthConfig(
                n_users=users,
                n_items=items,
                events_per_user=events_per_user,
                seed=seed,
                start_time=start_time,
                n_genres=genres,
            )
            log = generate(cfg)
        else:
            log = generate_long_range(
                LongRangeConfig(
                    scenario=scenario.value,
                    gap=gap,
                    n_users=users,
                    n_items=items,
                    n_genres=genres,
                    seed=seed,
                    returns=returns,
                    start_time=start_time,
                )
            )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    write_interactions(log, out)
    msg = f"wrote {len(log):,} events ({users:,} users, {items:,} items) to {out}"
    if write_item_table:
        item_path = items_path_for(out)
        write_items(log, item_path)
        msg += f" and {item_path}"
    typer.echo(f"{msg} in {time.perf_counter() - t0:.1f}s")


@config_options(TrainConfig)
def train(
    data: Annotated[Path, typer.Option("--data", help="Interactions file (user_id item_id timestamp).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/train_state (the last step written), same curve.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    **config: Any,
) -> None:
    """Train a model on the leave-one-out split of DATA; writes a checkpoint, log.jsonl and metrics.json.

    The defaults are the recipe of docs/results.md; every TrainConfig field is an option.
    """
    import json
    import os

    import torch

    from hytrec.model.tadn.dispatch import fla_importable
    from hytrec.training.train import train as run_training

    try:
        cfg = TrainConfig(**config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("torch sees no CUDA device (a CPU build of torch, or no GPU)", param_hint="--device")
    if cfg.kernel == "fla" and not fla_importable():
        raise typer.BadParameter("fla-core is not installed (pip install fla-core; needs CUDA)", param_hint="--kernel")
    result = run_training(data, out, cfg, resume=resume, quiet=quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns the same result
        typer.echo(json.dumps({k: result[k] for k in ("model_version", "best_epoch", "test")}, indent=2))


def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint directory.")],
    data: Annotated[Path, typer.Option("--data", help="Interactions file; evaluated on its leave-one-out test split.")],
    split: Annotated[Split, typer.Option("--split", help="Which held-out event to rank.")] = Split.TEST,
    request_time: Annotated[
        RequestTime,
        typer.Option(
            "--request-time",
            help="target: the held-out event's timestamp (the protocol) | last-event: the history's latest "
            "timestamp (a probe: how much the model leans on knowing the request time)",
        ),
    ] = RequestTime.TARGET,
    stream_state: Annotated[
        StateDtype | None,
        typer.Option(
            "--stream-state",
            help="HyTRec only: build each history's state through the serving recurrence, one event at a "
            "time, storing the state in this dtype after every event (default: parallel form)",
        ),
    ] = None,
    save_ranks: Annotated[
        Path | None,
        typer.Option(
            "--save-ranks",
            help="Write the target ranks as .npy like a training run: seen items excluded to FILE, nothing "
            "excluded to FILE's _unfiltered sibling (test_ranks.npy -> test_ranks_unfiltered.npy)",
        ),
    ] = None,
    tie_seed: Annotated[
        int | None,
        typer.Option(
            "--tie-seed",
            help="Order equal timestamps by this seed's permutation (default: the checkpoint's own training "
            "tie seed from its train_config.json, else file order)",
        ),
    ] = None,
    history_limit: Annotated[
        int | None,
        typer.Option(
            "--history-limit",
            min=1,
            help="The model reads only each history's last N events (a probe of what older events add); seen "
            "items removed from the ranking and the buckets stay the whole history's",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Full-ranking HR/NDCG@10/50/500, overall and per history-length bucket (seen items excluded and not)."""
    import dataclasses
    import json

    from hytrec.model.checkpoint import load_checkpoint
    from hytrec.training.data import Interactions, leave_one_out
    from hytrec.training.evaluate import evaluate_both

    t0 = time.perf_counter()
    ckpt = load_checkpoint(model)
    if tie_seed is None:
        tie_seed = run_tie_seed(model)
    interactions = Interactions.from_file(data, vocab=ckpt.vocab, tie_seed=tie_seed)
    eval_set = getattr(leave_one_out(interactions), split.value)
    if request_time is RequestTime.LAST_EVENT:
        h = eval_set.history
        eval_set = dataclasses.replace(eval_set, request_ts=h.timestamps[h.offsets[1:] - 1].copy())
    if stream_state is not None and ckpt.model_type == ModelType.SASREC:
        raise typer.BadParameter("needs a HyTRec model (SASRec+ has no recurrent state)", param_hint="--stream-state")
    filtered, unfiltered = evaluate_both(
        ckpt.model, eval_set, stream_dtype=stream_state.value if stream_state else None, history_limit=history_limit
    )
    if save_ranks is not None:
        import numpy as np

        np.save(save_ranks, filtered.ranks)
        np.save(unfiltered_ranks_path(save_ranks), unfiltered.ranks)
    result = {
        "model_version": ckpt.version,
        "split": split.value,
        "request_time": request_time.value,
        "state": f"streamed, stored as {stream_state.value}" if stream_state else "parallel form",
        "tie_seed": tie_seed,
        "history_limit": history_limit,
        "users": len(eval_set),
        "seconds": round(time.perf_counter() - t0, 2),
        "metrics": filtered.summary,
        "metrics_unfiltered": unfiltered.summary,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"{ckpt.version} on {data} ({split.value}, {len(eval_set)} users, {result['state']}, {result['seconds']} s); "
        "seen items excluded:"
    )
    typer.echo(format_summary(filtered.summary))


def unfiltered_ranks_path(filtered: Path) -> Path:
    """Where the repeat-aware ranks go beside ``filtered``: the name a training run gives them."""
    return filtered.with_name(f"{filtered.stem}_unfiltered{filtered.suffix or '.npy'}")


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

    from hytrec.eventlog import read_events
    from hytrec.model.serving import ServingModel

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
    runs: Annotated[
        list[Path] | None,
        typer.Argument(help="Run directories written by `hytrec train` (one data file).", show_default=False),
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of HR@10 per history-length bucket.")] = None,
    baseline: Annotated[
        str, typer.Option("--baseline", help="Row compared against: a model type (runs with slow heads: TYPE-slowN).")
    ] = ModelType.SASREC.value,
    candidate: Annotated[
        str, typer.Option("--candidate", help="Row compared (named as for --baseline).")
    ] = ModelType.HYTREC.value,
    from_page: Annotated[
        Path | None,
        typer.Option(
            "--from-page",
            help="Instead of RUNS: redraw the figures of a results page (e.g. docs/results.md) from the bucket "
            "table above each of its PNG links, in place.",
        ),
    ] = None,
) -> None:
    """Markdown tables of finished runs: metrics (mean ± std over seeds), buckets, paired bootstrap CIs."""
    from hytrec.training.report import redraw_page_figures, report

    if from_page is not None:
        if runs or plot:
            raise typer.BadParameter("--from-page takes no RUNS and no --plot", param_hint="--from-page")
        try:
            written = redraw_page_figures(from_page)
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--from-page") from exc
        typer.echo("\n".join(f"wrote {p}" for p in written))
        return
    if not runs:
        raise typer.BadParameter("give run directories, or --from-page", param_hint="RUNS")
    try:
        typer.echo(report(runs, baseline=baseline, candidate=candidate, plot=plot))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="RUNS") from exc
