"""Padding never leaks between users: a user's outputs do not depend on who shares the batch."""

from __future__ import annotations

import torch

from tests.helpers_model import make_model, random_history


def test_outputs_independent_of_batch_mates() -> None:
    model = make_model(chunk_size=16, window=8)
    lengths = [37, 5, 64, 1, 100]
    histories = [random_history(n, model.cfg.n_items, seed=i) for i, n in enumerate(lengths)]
    longest = max(lengths)
    items = torch.zeros(len(lengths), longest, dtype=torch.int64)
    times = torch.zeros(len(lengths), longest, dtype=torch.float64)
    for i, (it, ts) in enumerate(histories):
        items[i, : len(it)], times[i, : len(ts)] = it, ts
        times[i, len(ts) :] = ts[-1]
    query_times = times + 60.0
    with torch.inference_mode():
        together = model(items, times, query_times, torch.tensor(lengths))
        built = model.build_state(items, times, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            alone = model(items[i : i + 1, :n], times[i : i + 1, :n], query_times[i : i + 1, :n], torch.tensor([n]))
            assert torch.allclose(together[i, :n], alone[0], rtol=1e-5, atol=1e-6)
            built_alone = model.build_state(items[i : i + 1, :n], times[i : i + 1, :n], torch.tensor([n]))
            assert torch.allclose(built.tadn[i], built_alone.tadn[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(built.ring_items[i], built_alone.ring_items[0])


def test_inactive_users_unchanged_by_step() -> None:
    model = make_model()
    items, ts = random_history(20, model.cfg.n_items, seed=3)
    with torch.inference_mode():
        state = model.build_state(torch.stack([items, items]), torch.stack([ts, ts]), torch.tensor([20, 20]))
        new = model.step(state, items[:2], ts[:2] + 1e6, active=torch.tensor([True, False]))
    assert new.count.tolist() == [21, 20]
    assert torch.equal(new.tadn[1], state.tadn[1]) and torch.equal(new.ring_items[1], state.ring_items[1])
    assert not torch.equal(new.tadn[0], state.tadn[0])
