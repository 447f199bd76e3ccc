"""The chunked parallel form of the (time-aware) gated delta rule against the literal recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hytrec.model.layers import TADNLayer
from hytrec.model.tadn import (
    chunk_gated_delta_rule,
    recurrent_gated_delta_step,
    time_deltas,
    time_feature,
)
from hytrec.model.tadn.naive import naive_gated_delta_rule, use_naive_recurrence
from tests.helpers_model import make_model, random_history

CHUNK = 16
LENGTHS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 1000]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_inputs(length: int, dtype: torch.dtype, seed: int = 0, b: int = 2, h: int = 2, dk: int = 8, dv: int = 6):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, h, length, dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(b, h, length, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(b, h, length, dv, generator=gen, dtype=dtype)
    g = -torch.rand(b, h, length, generator=gen, dtype=dtype) * 0.5
    beta = torch.rand(b, h, length, generator=gen, dtype=dtype)
    s0 = torch.randn(b, h, dv, dk, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, g, beta, s0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_matches_naive_outputs_and_gradients(length: int, dtype: torch.dtype) -> None:
    inputs = random_inputs(length, dtype, seed=length)
    o_ref, s_ref = naive_gated_delta_rule(*inputs[:5], initial_state=inputs[5])
    o, s = chunk_gated_delta_rule(*inputs[:5], chunk_size=CHUNK, initial_state=inputs[5])
    assert rel_err(o, o_ref) <= TOL[dtype]
    assert rel_err(s, s_ref) <= TOL[dtype]
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = torch.randn(o.shape, generator=gen, dtype=dtype), torch.randn(s.shape, generator=gen, dtype=dtype)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), inputs)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)
    for name, ga, gb in zip(["q", "k", "v", "g", "beta", "s0"], grads, grads_ref, strict=True):
        assert rel_err(ga, gb) <= TOL[dtype], name


def test_recurrent_step_matches_naive() -> None:
    q, k, v, g, beta, s0 = (t.detach() for t in random_inputs(50, torch.float64))
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    state, outs = s0, []
    for t in range(50):
        o, state = recurrent_gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], state)
        outs.append(o)
    assert rel_err(torch.stack(outs, dim=2), o_ref) <= 1e-12
    assert rel_err(state, s_ref) <= 1e-12


def test_strong_decay_does_not_overflow() -> None:
    """Huge gaps give log-decays of -1000 and beyond: the chunked form must stay finite and exact."""
    q, k, v, g, beta, s0 = (t.detach() for t in random_inputs(3 * CHUNK, torch.float64))
    g = g.clone()
    g[..., 5] = -2000.0
    g[..., CHUNK + 3 :] = -50.0
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=CHUNK, initial_state=s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) <= 1e-9 and rel_err(s, s_ref) <= 1e-9


def test_time_deltas_running_max() -> None:
    times = torch.tensor([[100.0, 100.0, 160.0, 130.0, 170.0, 1e12]], dtype=torch.float64)
    assert time_deltas(times).tolist() == [[0.0, 0.0, 60.0, 0.0, 10.0, 1e12 - 170.0]]
    phi = time_feature(time_deltas(times), tau=60.0)
    assert phi[0, 0] == 0 and phi[0, 2] == pytest.approx(torch.log1p(torch.tensor(1.0)).item())


def edge_case_times(length: int, gen: torch.Generator) -> torch.Tensor:
    """Bursts with Delta = 0, ordinary gaps, a few huge gaps and out-of-order events."""
    gaps = torch.rand(length, generator=gen, dtype=torch.float64) * 3600
    gaps[torch.rand(length, generator=gen) < 0.3] = 0.0
    gaps[torch.rand(length, generator=gen) < 0.02] = 3e8
    times = 1.6e9 + gaps.cumsum(0)
    back = torch.rand(length, generator=gen) < 0.05
    return torch.where(back, times - 5000.0, times)


@pytest.mark.parametrize("time_terms", [True, False])
@pytest.mark.parametrize("length", LENGTHS)
def test_tadn_layer_chunked_matches_naive(length: int, time_terms: bool) -> None:
    """The full layer (gates, time terms, gated norm) in fp64: outputs, states and parameter gradients."""
    torch.manual_seed(length)
    layer = TADNLayer(d_model=16, n_heads=2, time_terms=time_terms).double()
    with torch.no_grad():  # non-trivial time parameters so the time terms matter
        layer.lambda_raw.copy_(torch.tensor([0.3, -1.0]))
        layer.mu.copy_(torch.tensor([0.5, -0.5]))
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 16, dtype=torch.float64, generator=gen)
    times = torch.stack([edge_case_times(length, gen) for _ in range(2)])
    phi = time_feature(time_deltas(times), tau=60.0, dtype=torch.float64)
    valid = torch.ones(2, length, dtype=torch.bool)
    # the reference: the layer's own projections and read-out around the literal recurrence
    heads_first = [t.transpose(1, 2) for t in layer.project(x, phi)]
    o_ref, s_ref = naive_gated_delta_rule(*heads_first)
    y_ref = layer.read_out(o_ref.transpose(1, 2), x)
    y, s = layer(x, phi, valid, chunk_size=CHUNK)
    assert rel_err(y, y_ref) <= 1e-9 and rel_err(s, s_ref) <= 1e-9
    params = [layer.a_log, layer.lambda_raw, layer.mu, layer.k_proj.weight, layer.b_proj.bias]
    grads_ref = torch.autograd.grad(y_ref.sum() + s_ref.sum(), params, allow_unused=True)
    grads = torch.autograd.grad(y.sum() + s.sum(), params, allow_unused=True)
    for ga, gb in zip(grads, grads_ref, strict=True):
        if gb is None:  # lambda / mu without time terms
            assert ga is None and not time_terms
            continue
        assert rel_err(ga, gb) <= 1e-9


def test_whole_model_on_the_naive_recurrence_matches() -> None:
    """``use_naive_recurrence`` (the benchmark's "naive" series) swaps only the kernel: same user vectors."""
    model = make_model(chunk_size=CHUNK).double()
    items, ts = random_history(3 * CHUNK + 5, model.cfg.n_items, seed=4)
    args = (items[None], ts[None], ts[None] + 30.0, torch.tensor([len(items)]))
    with torch.no_grad():
        chunked = model(*args)
        naive = use_naive_recurrence(model)(*args)
    assert rel_err(naive, chunked) <= 1e-9


def test_time_terms_change_the_gates() -> None:
    torch.manual_seed(0)
    layer = TADNLayer(16, 2, time_terms=True)
    x = torch.randn(1, 3, 16)
    _, _, _, g_short, beta_short = layer.project(x, torch.zeros(1, 3))
    _, _, _, g_long, _ = layer.project(x, torch.full((1, 3), 10.0))
    assert (g_long < g_short).all()  # a long gap makes the layer trust its past less
    notime = TADNLayer(16, 2, time_terms=False)
    notime.load_state_dict(layer.state_dict())
    assert torch.equal(notime.project(x, torch.zeros(1, 3))[3], notime.project(x, torch.full((1, 3), 10.0))[3])
