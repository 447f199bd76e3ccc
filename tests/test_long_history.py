"""Issue 16: the state read by the current intent (``hytrec-intent``) and the planted long-range scenarios.

The chunked read S_t q'_t equals the literal loop's (values and gradients); the variant serves through the same
state as ``hytrec`` and its user vector through the serving path equals the training forward after a checkpoint
round trip; the scenario generator plants what docs/long_history.md says it plants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from hytrec.model.checkpoint import load_checkpoint
from hytrec.model.serving import ServingModel
from hytrec.model.state import StateBatch
from hytrec.model.tadn import chunk_gated_delta_rule_with_read, naive_gated_delta_rule_with_read
from hytrec.training.commands import synth
from hytrec.training.data import Interactions, leave_one_out
from hytrec.training.synth import DAY, SCENARIOS, LongRangeConfig, generate_long_range, write_interactions
from hytrec.training.train import TrainConfig, train
from tests.helpers_model import make_model, random_history
from tests.test_parity import parallel, rel_err


def _inputs(length: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    b, h, d = 2, 2, 8

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = torch.nn.functional.normalize(r(b, h, length, d), dim=-1)
    k = torch.nn.functional.normalize(r(b, h, length, d), dim=-1)
    read_q = torch.nn.functional.normalize(r(b, h, length, d), dim=-1)
    g = -torch.rand(b, h, length, generator=gen, dtype=dtype)
    beta = torch.rand(b, h, length, generator=gen, dtype=dtype)
    return q, k, r(b, h, length, d), g, beta, read_q, r(b, h, d, d)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100])
def test_chunked_read_equals_the_literal_loop(length: int) -> None:
    q, k, v, g, beta, read_q, s0 = _inputs(length, seed=length)
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta, read_q, s0)]
    o, o_read, state = chunk_gated_delta_rule_with_read(q, k, v, g, beta, read_q, chunk_size=16, initial_state=s0)
    o_ref, o_read_ref, state_ref = naive_gated_delta_rule_with_read(q, k, v, g, beta, read_q, initial_state=s0)
    for a, b in ((o, o_ref), (o_read, o_read_ref), (state, state_ref)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(o_read, o)  # the second queries read something else than the layer's own
    weights = [torch.randn_like(t) for t in (o, o_read, state)]
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (o, o_read, state), strict=True)), leaves)
    grads_ref = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, (o_ref, o_read_ref, state_ref), strict=True)), leaves
    )
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9)


def test_intent_reads_what_lies_beyond_the_window() -> None:
    """hytrec-intent's user vector depends on events outside the window through the read S q even with the
    summary held fixed; hytrec's reaches its TADN matrices only through the summary."""
    model = make_model("hytrec-intent", window=8)
    items, _ = random_history(200, model.cfg.n_items, seed=3)
    ts = 1.6e9 + 60.0 * torch.arange(200, dtype=torch.float64)  # steady: the random heads keep ~30 events
    other = items.clone()
    other[170:190] = (other[170:190] + 7 - 2) % model.cfg.n_items + 2  # other events 11..30 back, same last 10
    now = torch.tensor([float(ts.max()) + 60.0], dtype=torch.float64)
    with torch.inference_mode():
        a = model.build_state(items[None], ts[None], torch.tensor([200]))
        b = model.build_state(other[None], ts[None], torch.tensor([200]))
        b.summary = a.summary  # only the TADN matrices differ now
        ua, ub = model.user_vector(a, now), model.user_vector(b, now)
        base = make_model("hytrec", window=8)
        a2 = base.build_state(items[None], ts[None], torch.tensor([200]))
        b2 = base.build_state(other[None], ts[None], torch.tensor([200]))
        b2.summary = a2.summary
        same = base.user_vector(a2, now), base.user_vector(b2, now)
    assert rel_err(ua, ub).item() > 1e-3
    assert torch.equal(*same)  # hytrec reads its TADN matrices only through the summary


def test_trained_intent_checkpoint_serves_what_it_trained(tmp_path: Path) -> None:
    """Train hytrec-intent for one epoch on a small dormant log, load the checkpoint as the service does, feed
    a user's history through ServingModel.advance in uneven batches, and get the training forward's vector."""
    log = generate_long_range(LongRangeConfig(gap=70, n_users=40, n_items=200, n_genres=10, returns=1))
    data = tmp_path / "interactions.tsv"
    write_interactions(log, data)
    cfg = TrainConfig(
        model_type="hytrec-intent", epochs=1, d_model=16, window=16, chunk_size=16, seed=0, threads=1, batch_tokens=4096
    )
    result = train(data, tmp_path / "run", cfg, quiet=True)
    assert (tmp_path / "run" / "test_ranks_unfiltered.npy").exists() and result["test"]["all"]["n"] == 40
    serving = ServingModel.load(tmp_path / "run")
    model = load_checkpoint(tmp_path / "run").model
    d = Interactions.from_file(data, vocab=serving.vocab)
    rows, times = d.sequence(0)
    events = list(zip(rows.tolist(), times.tolist(), strict=True))
    state = None
    for lo, hi in ((0, 5), (5, 90), (90, 91), (91, len(events))):
        blob = serving.encode(serving.advance([state], [events[lo:hi]]))
        state = serving.decode(blob)
    now = torch.tensor([float(times[-1]) + 3600.0], dtype=torch.float64)
    with torch.inference_mode():
        served = model.user_vector(state, now)
        trained = parallel(model, [(torch.from_numpy(rows), torch.from_numpy(times))], now)
    assert rel_err(served, trained).item() < 1e-4
    assert isinstance(state, StateBatch) and state.tadn.shape[1] == cfg.n_layers


# ----------------------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_plants_a_dependency_beyond_the_window(scenario: str) -> None:
    cfg = LongRangeConfig(scenario=scenario, gap=120, n_users=30, n_items=400, n_genres=10)
    log = generate_long_range(cfg)
    again = generate_long_range(cfg)
    assert np.array_equal(log.items, again.items) and np.array_equal(log.timestamps, again.timestamps)
    genre = log.item_genre[log.items - 1]
    window = int(cfg.gap * (1 - cfg.jitter))
    for u in range(1, cfg.n_users + 1):
        at = np.flatnonzero(log.users == u)
        g, planted, ts = genre[at], log.planted[at], log.timestamps[at]
        assert planted[-1] and planted.sum() == cfg.returns + 2  # the first burst, the returns, the test event
        d = g[-1]
        bursts = np.flatnonzero(planted)
        assert (g[bursts] == d).all()
        # the test event's genre is nowhere in the window before it, and present earlier in the history
        assert not (g[-1 - window : -1] == d).any() and (g[:-window] == d).sum() >= cfg.burst
        if scenario == "reconsume":
            assert log.items[at][-1] in set(log.items[at][:-window].tolist())
        gaps = np.diff(ts)
        if scenario == "periodic":
            assert set(np.diff(bursts).tolist()) == {cfg.gap + cfg.burst}
        else:  # the pause cue: every return comes after a longer gap than any background gap
            cue = gaps[bursts[1:] - 1]
            assert cue.min() >= 10 * DAY - 1 and np.delete(gaps, bursts[1:] - 1).max() <= 3 * DAY + 3600
    # leave-one-out: the test target is the planted return, the validation target a background event
    path_users = cfg.n_users
    assert int(log.planted.sum()) == path_users * (cfg.returns + 2)


def test_scenario_config_is_checked() -> None:
    with pytest.raises(ValueError, match="scenario"):
        LongRangeConfig(scenario="nope")
    with pytest.raises(ValueError, match="gap"):
        LongRangeConfig(gap=0)


def test_synth_command_writes_a_scenario(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("synth")(synth)
    app.command("other")(lambda: None)
    out = tmp_path / "interactions.tsv.gz"
    args = ["synth", "--scenario", "reconsume", "--gap", "100", "--users", "12", "--items", "300", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    split = leave_one_out(Interactions.from_file(out))
    assert len(split.test) == 12 and split.test.history_lengths.min() > 3 * 75
    res = CliRunner().invoke(app, [*args[:2], "sideways", *args[3:]])
    assert res.exit_code != 0
