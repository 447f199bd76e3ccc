"""Training-side commands registered by ``hytrec/cli.py``.

Only ``synth`` lives here for now; ``train``, ``evaluate`` and ``recommend`` will be added to this file by
the trainer / evaluator work.
"""

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
    from training.synth import SynthConfig, generate, items_path_for, write_interactions, write_items

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


# train, evaluate and recommend are added to this file later by the trainer/evaluator work (see hytrec/cli.py).
