"""The one dispatch point of the chunked delta rule: PyTorch (:mod:`hytrec.model.tadn.chunk`) or fla-core's
Triton kernel, behind :func:`chunk_gated_delta_rule`'s signature; the model calls nothing else.

The recurrence always runs in fp32 (fp64 when given fp64), whatever autocast is active (bf16 training
autocasts the projections around it): fp16 / bf16 inputs are cast up and autocast is off inside. The fla
kernel (``pip install fla-core``, CUDA only, not in the lock) is used when :func:`set_kernel` says ``fla``,
or ``auto`` and it is importable, the tensors are on CUDA and it matches the PyTorch form on a random probe
(:func:`fla_parity`). fla takes its q, k, v and beta in bf16 (as its own tests do) and keeps its state and
g in fp32; it reads (B, L, H, d) and stores the state as (B, H, d_k, d_v), the transpose of ours, which the
wrapper handles.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
from torch import Tensor

from hytrec.model.tadn import chunk as torch_form

KERNELS = ("auto", "torch", "fla")
_kernel = "auto"


def set_kernel(kind: str) -> None:
    """Select the implementation for every later call: ``auto``, ``torch`` or ``fla`` (fla raises if unusable)."""
    global _kernel
    if kind not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kind!r}")
    if kind == "fla" and not fla_importable():
        raise RuntimeError("--kernel fla: fla-core is not installed (pip install fla-core; it needs CUDA)")
    _kernel = kind


def fla_importable() -> bool:
    return importlib.util.find_spec("fla") is not None


def _fla_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk_size: int = 64, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """fla-core's ``chunk_gated_delta_rule`` in our layout (its chunk size is its own; ``chunk_size`` is unused)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    def seq_first(x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.transpose(1, 2).to(dtype).contiguous()

    h0 = initial_state.transpose(-1, -2).float().contiguous() if initial_state is not None else None
    o, state = fla_chunk(
        seq_first(q, torch.bfloat16),
        seq_first(k, torch.bfloat16),
        seq_first(v, torch.bfloat16),
        seq_first(g, torch.float32),
        seq_first(beta, torch.bfloat16),
        scale=1.0,  # our q is already scaled (TADNLayer.project)
        initial_state=h0,
        output_final_state=True,
    )
    return o.transpose(1, 2).float(), state.transpose(-1, -2).float()


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp16 / bf16 cast up to fp32; fp32 and fp64 (the tests' reference runs) unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@functools.cache
def fla_parity(device: str, tol: float = 2e-2) -> bool:
    """fla against the PyTorch form on a random probe on ``device``: outputs, final states and gradients of
    q, k, v, g, beta within ``tol`` relative error (bf16 inputs: ~3 significant digits)."""
    if not fla_importable():
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    b, h, length, d = 2, 2, 100, 32

    def probe() -> list[Tensor]:
        q = torch.nn.functional.normalize(torch.randn(b, h, length, d, device=device, generator=gen), dim=-1)
        k = torch.nn.functional.normalize(torch.randn(b, h, length, d, device=device, generator=gen), dim=-1)
        v = torch.randn(b, h, length, d, device=device, generator=gen)
        g = -torch.rand(b, h, length, device=device, generator=gen) * 0.5
        beta = torch.rand(b, h, length, device=device, generator=gen)
        s0 = torch.randn(b, h, d, d, device=device, generator=gen) * 0.1
        return [x.requires_grad_() for x in (q, k, v, g, beta, s0)]

    inputs = probe()
    results = []
    try:
        for rule in (torch_form.chunk_gated_delta_rule, _fla_rule):
            xs = [x.detach().clone().requires_grad_() for x in inputs]
            o, s = rule(*xs[:5], initial_state=xs[5])
            (o.square().sum() + s.square().sum()).backward()
            results.append([o, s, *(x.grad for x in xs)])
    except Exception as exc:  # an fla build that does not run here (no CUDA, Triton version)
        warnings.warn(f"fla-core kernel unusable, using PyTorch: {exc!r}", stacklevel=2)
        return False
    errors = [relative_error(a, b) for a, b in zip(results[1], results[0], strict=True)]
    if max(errors) > tol:
        warnings.warn(f"fla-core kernel fails its parity check (relative errors {errors}), using PyTorch", stacklevel=2)
        return False
    return True


def _use_fla(q: Tensor) -> bool:
    if _kernel == "torch" or not q.is_cuda:
        return False
    if _kernel == "fla":
        return True
    return fla_parity(str(q.device))


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`hytrec.model.tadn.chunk.chunk_gated_delta_rule` (same arguments and result), in fp32, on the
    selected implementation."""
    with torch.autocast(q.device.type, enabled=False):
        if initial_state is not None:
            initial_state = _at_least_fp32(initial_state)
        if _use_fla(q):
            return _fla_rule(q, k, v, g, beta, chunk_size, initial_state)
        q, k, v, g, beta = (_at_least_fp32(x) for x in (q, k, v, g, beta))
        return torch_form.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size, initial_state)


def chunk_gated_delta_rule_with_read(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    read_q: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`hytrec.model.tadn.chunk.chunk_gated_delta_rule_with_read` in fp32 (PyTorch only: fla has no
    second read)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, g, beta, read_q = (_at_least_fp32(x) for x in (q, k, v, g, beta, read_q))
        if initial_state is not None:
            initial_state = _at_least_fp32(initial_state)
        return torch_form.chunk_gated_delta_rule_with_read(q, k, v, g, beta, read_q, chunk_size, initial_state)
