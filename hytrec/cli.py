"""The `hytrec` command: a thin shell over the functions the service and the training code call.

Each group of subcommands lives beside the code it drives (``<package>/commands.py``) and is
registered here; heavy imports (torch, redis) happen inside the commands, so `hytrec --help` is fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="HyTRec: online recommendations for very long behaviour histories.", no_args_is_help=True)
bench = typer.Typer(help="Benchmarks, measured on this machine in one run.", no_args_is_help=True)
app.add_typer(bench, name="bench")

# (module, attribute, target app, command name); a module that does not exist yet is skipped.
_COMMANDS: list[tuple[str, str, typer.Typer, str]] = [
    ("benchmarks.model_bench", "bench_model", bench, "model"),
    ("benchmarks.store_bench", "bench_store", bench, "store"),
    ("benchmarks.train_bench", "bench_train", bench, "train"),
    ("benchmarks.state_dtype_bench", "bench_state_dtype", bench, "state-dtype"),
    ("training.commands", "synth", app, "synth"),
    ("training.commands", "train", app, "train"),
    ("training.commands", "evaluate", app, "eval"),
    ("training.commands", "recommend", app, "recommend"),
    ("training.commands", "results", app, "results"),
    ("service.commands", "serve", app, "serve"),
    ("service.commands", "replay", app, "replay"),
    ("service.commands", "backfill", app, "backfill"),
]

for _module, _attr, _target, _name in _COMMANDS:
    try:
        _fn = getattr(importlib.import_module(_module), _attr)
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a package is being built
        if exc.name != _module:
            raise
        continue
    _target.command(_name)(_fn)


if __name__ == "__main__":
    app()
