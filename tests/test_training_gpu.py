"""--device cuda, bf16 autocast and the optional fla-core kernel behind the delta rule's one dispatch point.

The CUDA and fla tests are skipped where there is no CUDA device (CI, this project's CPU machines) or no
fla-core (it is not in the lock: it needs CUDA); the bf16 autocast path also runs on CPU and is tested here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hytrec.cli import app
from hytrec.model.tadn import chunk as torch_form
from hytrec.model.tadn import dispatch
from hytrec.training.synth import SynthConfig, generate, write_interactions
from hytrec.training.train import TrainConfig, train

CUDA = torch.cuda.is_available()
FLA = importlib.util.find_spec("fla") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")
needs_fla = pytest.mark.skipif(not (CUDA and FLA), reason="needs a CUDA device and fla-core (pip install fla-core)")
SMALL = {"d_model": 16, "window": 8, "chunk_size": 16, "batch_tokens": 2048, "epochs": 1, "threads": 1}


@pytest.fixture(scope="module")
def log_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "log.tsv"
    write_interactions(generate(SynthConfig(n_users=40, n_items=50, events_per_user="10:60", seed=6)), path)
    return path


def _inputs(device: str, b: int = 2, h: int = 2, length: int = 70, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, h, length, d, device=device, generator=gen), dim=-1) * d**-0.5
    k = torch.nn.functional.normalize(torch.randn(b, h, length, d, device=device, generator=gen), dim=-1)
    v = torch.randn(b, h, length, d, device=device, generator=gen)
    g = -torch.rand(b, h, length, device=device, generator=gen)
    beta = torch.rand(b, h, length, device=device, generator=gen)
    s0 = torch.randn(b, h, d, d, device=device, generator=gen) * 0.1
    return [x.requires_grad_() for x in (q, k, v, g, beta, s0)]


def test_the_recurrence_stays_fp32_under_bf16_autocast() -> None:
    """Under autocast the dispatch point computes exactly the fp32 PyTorch form (inputs cast up, autocast off)."""
    xs = _inputs("cpu")
    reference = torch_form.chunk_gated_delta_rule(*xs[:5], chunk_size=16, initial_state=xs[5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16  # autocast is on around it
        o, s = dispatch.chunk_gated_delta_rule(*xs[:5], chunk_size=16, initial_state=xs[5])
    assert o.dtype is torch.float32 and s.dtype is torch.float32
    assert torch.equal(o, reference[0]) and torch.equal(s, reference[1])


def test_bf16_training_on_cpu_runs_and_stays_close_to_fp32(tmp_path: Path, log_file: Path) -> None:
    fp32 = train(log_file, tmp_path / "fp32", TrainConfig(**SMALL), quiet=True)
    bf16 = train(log_file, tmp_path / "bf16", TrainConfig(**SMALL, precision="bf16"), quiet=True)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
        for run in ("fp32", "bf16")
    ]
    assert losses[0] != losses[1]  # autocast did change the computation
    # bf16 matmuls keep ~3 significant digits; measured on the log of tests/test_distributed.py, one thread:
    # per-step relative loss difference 1.0e-5 at step 1, at most 1.4e-3 over 15 steps. Bound: 1e-2 at step 1.
    assert abs(losses[0][0] - losses[1][0]) / losses[0][0] < 1e-2, losses
    assert bf16["epochs_run"] == fp32["epochs_run"] == 1


def test_the_kernel_choice_is_validated(tmp_path: Path, log_file: Path) -> None:
    with pytest.raises(ValueError, match="kernel"):
        dispatch.set_kernel("triton")
    runner = CliRunner()
    base = ["train", "--data", str(log_file), "--out", str(tmp_path / "x"), "--quiet"]
    if not CUDA:
        res = runner.invoke(app, [*base, "--device", "cuda"])
        assert res.exit_code == 2 and "--device" in res.output and "CUDA" in res.output
    if not FLA:
        res = runner.invoke(app, [*base, "--kernel", "fla"])
        assert res.exit_code == 2 and "fla-core" in res.output
    res = runner.invoke(app, [*base, "--grad-clip", "-1"])
    assert res.exit_code == 2 and "grad_clip" in res.output
    assert not (tmp_path / "x").exists()  # nothing was written for a rejected command
    dispatch.set_kernel("torch")
    try:  # on CPU tensors every choice runs the PyTorch form
        xs = _inputs("cpu")
        o, _ = dispatch.chunk_gated_delta_rule(*xs[:5], initial_state=xs[5])
        assert torch.equal(o, torch_form.chunk_gated_delta_rule(*xs[:5], initial_state=xs[5])[0])
    finally:
        dispatch.set_kernel("auto")


@needs_cuda
def test_cuda_training_with_bf16(tmp_path: Path, log_file: Path) -> None:
    result = train(log_file, tmp_path, TrainConfig(**SMALL, device="cuda", precision="bf16"), quiet=True)
    assert result["epochs_run"] == 1 and result["test"]["all"]["n"] > 0


@needs_cuda
def test_torch_form_on_cuda_matches_cpu() -> None:
    cpu = _inputs("cpu")
    gpu = [x.detach().cuda().requires_grad_() for x in cpu]
    for xs in (cpu, gpu):
        o, s = torch_form.chunk_gated_delta_rule(*xs[:5], chunk_size=16, initial_state=xs[5])
        (o.square().sum() + s.square().sum()).backward()
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.allclose(a.grad, b.grad.cpu(), rtol=1e-4, atol=1e-5)


@needs_fla
@pytest.mark.parametrize("length", [1, 50, 64, 200])
def test_fla_kernel_matches_the_pytorch_form(length: int) -> None:
    """Outputs, final states and gradients of every input (incl. the initial state), bf16 inputs to fla."""
    xs = _inputs("cuda", length=length, d=32)
    results = []
    for rule in (torch_form.chunk_gated_delta_rule, dispatch._fla_rule):
        ys = [x.detach().clone().requires_grad_() for x in xs]
        o, s = rule(*ys[:5], initial_state=ys[5])
        (o.square().sum() + s.square().sum()).backward()
        results.append([o, s, *(y.grad for y in ys)])
    errors = [dispatch.relative_error(a, b) for a, b in zip(results[1], results[0], strict=True)]
    assert max(errors) < 2e-2, errors
    assert dispatch.fla_parity("cuda:0")
