"""Synthetic log generator and the `synth` command (training/synth.py, training/commands.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from hytrec.training.commands import synth
from hytrec.training.data import Interactions, leave_one_out
from hytrec.training.synth import SynthConfig, generate, items_path_for, parse_events_spec, write_interactions


def small(**kw) -> SynthConfig:
    base = {"n_users": 50, "n_items": 400, "events_per_user": "100:300", "seed": 7}
    return SynthConfig(**(base | kw))


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a, b, c = generate(small()), generate(small()), generate(small(seed=8))
    for name in ("users", "items", "timestamps", "session", "reconsumed"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.items[: len(c)], c.items[: len(a)])
    write_interactions(a, tmp_path / "a.tsv.gz")
    write_interactions(b, tmp_path / "b.tsv.gz")
    assert (tmp_path / "a.tsv.gz").read_bytes() == (tmp_path / "b.tsv.gz").read_bytes()


@pytest.mark.parametrize("name", ["log.tsv", "log.tsv.gz"])
def test_format_loadable(tmp_path: Path, name: str) -> None:
    log = generate(small())
    path = tmp_path / name
    write_interactions(log, path)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    d = Interactions.from_file(path)
    assert d.n_users == 50 and d.n_events == len(log)
    assert d.vocab.n_items <= 400 and set(d.vocab.ids) <= {str(k) for k in range(1, 401)}
    # the file is grouped by user and in time order, so loading keeps it as is
    assert d.vocab.decode(d.items) == [str(x) for x in log.items.tolist()]
    assert np.array_equal(d.timestamps, log.timestamps.astype(float))
    assert np.all(d.lengths >= 100) and np.all(d.lengths <= 300)
    assert len(leave_one_out(d).test) == 50


def test_events_per_user_specs() -> None:
    rng = np.random.default_rng(0)
    assert parse_events_spec("5", 3, rng).tolist() == [5, 5, 5]
    assert parse_events_spec(7, 2, rng).tolist() == [7, 7]
    r = parse_events_spec("10:12", 1000, rng)
    assert set(r.tolist()) == {10, 11, 12}
    ln = parse_events_spec("lognormal:200", 20000, rng)
    assert ln.min() >= 3 and 180 < ln.mean() < 220
    assert parse_events_spec("ln:50:0", 4, rng).tolist() == [50, 50, 50, 50]
    for bad in ("0", "x", "5:2", "0:3", "lognormal:-1", "lognormal:", "1:2:3"):
        with pytest.raises(ValueError, match="events-per-user"):
            parse_events_spec(bad, 1, rng)


def test_time_gaps_sessions_and_reconsumption() -> None:
    log = generate(small(n_users=100, events_per_user=400))
    same_user = log.users[1:] == log.users[:-1]
    gaps = np.diff(log.timestamps)[same_user]
    assert (gaps >= 0).all()
    new_session = (log.session[1:] != log.session[:-1])[same_user]
    within, between = gaps[~new_session], gaps[new_session]
    assert 20 < np.median(within) < 300  # about a minute
    assert np.median(between) > 50 * np.median(within)
    assert np.percentile(between, 10) > np.percentile(within, 90)
    # sessions are short and numerous
    sessions_per_user = len(np.unique(log.session)) / 100
    assert 30 < sessions_per_user < 120
    # re-consumption is present, repeats an item of the same user seen at least min_back events before
    assert 0.02 < log.reconsumed.mean() < 0.3
    cfg = small()
    for t in np.flatnonzero(log.reconsumed)[:200]:
        u = log.users[t]
        first = np.searchsorted(log.users, u)
        earlier = log.items[first : t - cfg.min_back + 1]
        assert log.items[t] in earlier
    # re-consumption happens mostly at session starts (after a long gap)
    starts = np.r_[True, log.session[1:] != log.session[:-1]]
    assert log.reconsumed[starts].mean() > 3 * log.reconsumed[~starts].mean()


def test_long_term_tastes_concentrate_on_few_genres() -> None:
    log = generate(small(n_users=40, events_per_user=500, n_genres=20))
    top3 = []
    for u in range(1, 41):
        g = np.bincount(log.item_genre[log.items[log.users == u] - 1], minlength=20)
        top3.append(np.sort(g)[-3:].sum() / g.sum())
    assert np.mean(top3) > 0.5  # uniform over 20 genres would give 0.15


def test_fast_for_long_and_many_users() -> None:
    t0 = time.perf_counter()
    one = generate(SynthConfig(n_users=1, n_items=10000, events_per_user=100_000, seed=0))
    many = generate(SynthConfig(n_users=2000, n_items=5000, events_per_user=500, seed=0))
    assert len(one) == 100_000 and len(many) == 1_000_000
    assert time.perf_counter() - t0 < 10


def test_items_path() -> None:
    assert items_path_for("d/interactions.tsv.gz") == Path("d/items.tsv")
    assert items_path_for("d/big.tsv.gz") == Path("d/big.items.tsv")
    assert items_path_for("d/log") == Path("d/log.items.tsv")


def test_synth_command(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("synth")(synth)
    app.command("other")(lambda: None)  # keep typer in multi-command mode, as in hytrec/cli.py
    out = tmp_path / "x" / "interactions.tsv.gz"
    args = ["synth", "--users", "20", "--items", "100", "--events-per-user", "10:30", "--seed", "3", "--out"]
    res = CliRunner().invoke(app, [*args, str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    d = Interactions.from_file(out)
    assert d.n_users == 20
    assert (tmp_path / "x" / "items.tsv").read_text().startswith("item_id\ttitle")
    first = out.read_bytes()
    assert CliRunner().invoke(app, [*args, str(out)]).exit_code == 0
    assert out.read_bytes() == first
    res = CliRunner().invoke(app, ["synth", "--events-per-user", "nope", "--out", str(tmp_path / "y.tsv")])
    assert res.exit_code != 0 and "events-per-user" in res.output
