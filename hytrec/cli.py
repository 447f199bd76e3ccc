"""The `hytrec` command: a thin shell over the functions the service and the training code call.

Each group of subcommands lives beside the code it drives (``<package>/commands.py``) and is
registered here; heavy imports (torch, redis) happen inside the commands, so `hytrec --help` is fast.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

app = typer.Typer(help="HyTRec: online recommendations for very long behaviour histories.", no_args_is_help=True)
bench = typer.Typer(help="Benchmarks, measured on this machine in one run.", no_args_is_help=True)
app.add_typer(bench, name="bench")
ops = typer.Typer(help="Operations files of deploy/: dashboard and alert rules.", no_args_is_help=True)
app.add_typer(ops, name="ops")
versions = typer.Typer(
    help="Model versions of a running service: add, set (swap, canary), show, drop.", no_args_is_help=True
)
app.add_typer(versions, name="versions")
impressions = typer.Typer(help="The impression log of online evaluation: export, compare.", no_args_is_help=True)
app.add_typer(impressions, name="impressions")

# (module, attribute, target app, command name).
_COMMANDS: list[tuple[str, str, typer.Typer, str]] = [
    ("hytrec.benchmarks.model_bench", "bench_model", bench, "model"),
    ("hytrec.benchmarks.store_bench", "bench_store", bench, "store"),
    ("hytrec.benchmarks.train_bench", "bench_train", bench, "train"),
    ("hytrec.benchmarks.state_dtype_bench", "bench_state_dtype", bench, "state-dtype"),
    ("hytrec.benchmarks.serving_bench", "bench_serving", bench, "serving"),
    ("hytrec.benchmarks.stream_bench", "bench_streams", bench, "streams"),
    ("hytrec.benchmarks.online_eval_bench", "bench_online_eval", bench, "online-eval"),
    ("hytrec.benchmarks.filter_bench", "bench_filters", bench, "filters"),
    ("hytrec.training.commands", "synth", app, "synth"),
    ("hytrec.training.commands", "train", app, "train"),
    ("hytrec.training.commands", "evaluate", app, "eval"),
    ("hytrec.training.commands", "recommend", app, "recommend"),
    ("hytrec.training.commands", "results", app, "results"),
    ("hytrec.service.commands", "serve", app, "serve"),
    ("hytrec.service.commands", "replay", app, "replay"),
    ("hytrec.service.commands", "backfill", app, "backfill"),
    ("hytrec.service.commands", "archive", app, "archive"),
    ("hytrec.service.commands", "export", app, "export"),
    ("hytrec.service.commands", "versions_add", versions, "add"),
    ("hytrec.service.commands", "versions_set", versions, "set"),
    ("hytrec.service.commands", "versions_show", versions, "show"),
    ("hytrec.service.commands", "versions_drop", versions, "drop"),
    ("hytrec.streams.commands", "consume", app, "consume"),
    ("hytrec.loadtest.commands", "loadtest", app, "loadtest"),
    ("hytrec.loadtest.soak", "soak", app, "soak"),
    ("hytrec.ops", "render", ops, "render"),
    ("hytrec.ops", "access_log_cost", ops, "access-log-cost"),
    ("hytrec.service.impressions", "export", impressions, "export"),
    ("hytrec.service.impressions", "compare", impressions, "compare"),
]


@app.command("docs")
def docs(
    check: Annotated[bool, typer.Option("--check", help="Only report pages whose generated tables are stale.")] = False,
) -> None:
    """Regenerate the settings and metrics tables of docs/ from the code that defines them."""
    from hytrec.docs import update

    stale = update(check=check)
    for page in stale:
        typer.echo(f"{'stale' if check else 'updated'}: {page}")
    if check and stale:
        raise typer.Exit(1)


for _module, _attr, _target, _name in _COMMANDS:
    _target.command(_name)(getattr(importlib.import_module(_module), _attr))


if __name__ == "__main__":
    app()
