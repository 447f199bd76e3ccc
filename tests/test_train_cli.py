"""`hytrec train` is built from TrainConfig: one option per field, the dataclass's defaults, the documented recipe."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from hytrec.cli import app
from hytrec.model.checkpoint import MODEL_TYPES
from hytrec.model.config import STATE_DTYPES
from hytrec.training.commands import config_options
from hytrec.training.config import Loss, ModelType, StateDtype, TrainConfig
from hytrec.training.synth import SynthConfig, generate, write_interactions

REPO = Path(__file__).resolve().parents[1]
CLI_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def train_command() -> Any:
    """The click command typer builds (typer >= 0.24 vendors click, so no click types here)."""
    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def parse_train(args: list[str]) -> TrainConfig:
    """The TrainConfig `hytrec train ARGS` would run with (parsing only, nothing is trained)."""
    params = train_command().make_context("train", args).params
    return TrainConfig(**{f.name: params[f.name] for f in CLI_FIELDS})


def test_choices_are_the_models_and_dtypes_the_code_knows() -> None:
    assert tuple(ModelType) == MODEL_TYPES
    assert tuple(StateDtype) == tuple(STATE_DTYPES)
    assert tuple(Loss) == ("full", "sampled")


def test_every_field_is_an_option_with_the_dataclass_default_and_help() -> None:
    options = {p.name: p for p in train_command().params if p.param_type_name == "option"}
    assert {f.name for f in CLI_FIELDS} | {"data", "out", "resume", "quiet"} == set(options)
    for f in CLI_FIELDS:
        opt = options[f.name]
        assert opt.opts == [f"--{f.name.replace('_', '-')}"]
        assert opt.help == f.metadata["help"]
        assert opt.default == f.default, f.name
    for option, good in (("--model-type", MODEL_TYPES), ("--state-dtype", STATE_DTYPES), ("--loss", Loss)):
        for value in good:
            parse_train(["--data", "d", "--out", "o", option, str(value)])
        with pytest.raises(Exception, match="nope"):  # the parser itself rejects a bad choice
            parse_train(["--data", "d", "--out", "o", option, "nope"])
    # A command-line config equals the dataclass's own defaults.
    assert parse_train(["--data", "d", "--out", "o"]) == TrainConfig()


def test_adding_a_field_adds_an_option() -> None:
    @dataclass
    class Config:
        width: int = field(default=3, metadata={"help": "How wide."})
        kind: Loss = field(default=Loss.FULL, metadata={"help": "Which loss."})
        hidden: dict = field(default_factory=dict, metadata={"help": "Not on the CLI.", "cli": False})

    seen: list[Config] = []

    @config_options(Config)
    def run(name: str, flag: bool = False, **config: object) -> None:
        seen.append(Config(**config))

    cli = typer.Typer()
    cli.command("run")(run)
    cli.command("other")(lambda: None)
    res = CliRunner().invoke(cli, ["run", "x", "--width", "5", "--kind", "sampled"])
    assert res.exit_code == 0, res.output
    assert seen == [Config(width=5, kind=Loss.SAMPLED)]
    assert CliRunner().invoke(cli, ["run", "x", "--hidden", "{}"]).exit_code != 0
    assert CliRunner().invoke(cli, ["run", "x", "--kind", "neither"]).exit_code != 0

    @dataclass
    class Undocumented:
        width: int = 3

    with pytest.raises(TypeError, match="help"):
        config_options(Undocumented)


@pytest.mark.parametrize("name", ["ml1m-hytrec", "ml1m-sasrec"])
def test_defaults_are_the_recipe_of_the_committed_checkpoints(name: str) -> None:
    """docs/results.md's recipe is what the committed ML-1M checkpoints were trained with (their config meta)."""
    meta = json.loads((REPO / "models" / name / "config.json").read_text())["meta"]
    cfg = dataclasses.asdict(TrainConfig(model_type=meta["model_type"]))
    differs = {k for k in cfg if k in meta and cfg[k] != meta[k]}
    assert differs == {"threads"}  # those runs used 1 thread (two runs shared 2 cores); the default is torch's


def _commands(text: str, prefix: str) -> list[str]:
    """Each command line starting with ``prefix``, with its backslash continuations joined."""
    out, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith(prefix):
            current = ""
        if current is not None:
            current += stripped.removesuffix("\\") + " "
            if not stripped.endswith("\\"):
                out.append(current.strip())
                current = None
    return out


def test_documented_train_commands_parse_and_reproduce_their_runs() -> None:
    """Every full `hytrec train` command of docs/results.md parses; the seed-0 ML-1M ones give the
    committed checkpoints' config (HyTRec's seed 0 had a 40-epoch budget, cut at 29 for time, as the page says)."""
    commands = [c for c in _commands((REPO / "docs" / "results.md").read_text(), "hytrec train ") if "..." not in c]
    assert len(commands) >= 5
    for command in commands:
        args = shlex.split(command.replace("$s", "0").replace("$m", "hytrec"))[2:]
        cfg = parse_train(args)
        if "ml-1m" in command and "-s$s" in command:
            meta = json.loads((REPO / "models" / f"ml1m-{cfg.model_type}" / "config.json").read_text())["meta"]
            expected = {**meta, "epochs": cfg.epochs} if cfg.model_type is ModelType.HYTREC else meta
            assert {k: v for k, v in dataclasses.asdict(cfg).items() if k in meta} == {
                k: expected[k] for k in dataclasses.asdict(cfg) if k in meta
            }


def test_make_demo_model_options_still_parse() -> None:
    makefile = (REPO / "Makefile").read_text().replace("$(DEMO_RUN)", "var/demo-run")
    [command] = _commands(makefile, "$(BIN)/hytrec train ")
    cfg = parse_train(shlex.split(command)[2:])
    assert (cfg.epochs, cfg.patience, cfg.state_dtype, cfg.threads) == (12, 3, StateDtype.FLOAT16, 1)


def test_train_command_end_to_end(tmp_path: Path) -> None:
    """A one-epoch run through the CLI writes the options it was given, and the defaults, to train_config.json."""
    data = tmp_path / "log.tsv"
    write_interactions(generate(SynthConfig(n_users=30, n_items=40, events_per_user="10:60", seed=2)), data)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--model-type", "tadn-only", "--epochs", "1"]
    args += ["--d-model", "16", "--window", "8", "--chunk-size", "16", "--batch-tokens", "2048", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["best_epoch"] == 1
    written = json.loads((out / "train_config.json").read_text())
    expected = dataclasses.asdict(
        TrainConfig(model_type="tadn-only", epochs=1, d_model=16, window=8, chunk_size=16, batch_tokens=2048)
    )
    assert written == {**expected, "data": str(data)}
    bad = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--loss", "softmax"])
    assert bad.exit_code != 0 and re.search(r"loss", bad.output)


def test_the_commands_of_docs_training_parse() -> None:
    """docs/training.md's `hytrec train` and `torchrun ... -m hytrec.cli train` lines are valid options."""
    text = (REPO / "docs" / "training.md").read_text()
    commands = _commands(text, "hytrec train ") + [
        "hytrec " + c.split("-m hytrec.cli ", 1)[1] for c in _commands(text, "torchrun ")
    ]
    assert len(commands) >= 6
    for command in commands:
        args = shlex.split(command.split("#")[0].replace("…", "d"))[2:]
        parse_train(args)
