"""The literal step-by-step gated delta rule: slow, obvious, and the reference the tests trust.

Tests call :func:`naive_gated_delta_rule` directly; nothing in the model's forward path takes a switch to it.
:func:`use_naive_recurrence` exists for the one place that needs a whole model on the literal loop (the
"naive" series of ``hytrec bench model``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def naive_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T with explicit matrices.

    Shapes as in :mod:`hytrec.model.tadn`; returns (o (B, H, L, d_v), final state (B, H, d_v, d_k)).
    """
    o, _, state = naive_gated_delta_rule_with_read(q, k, v, g, beta, None, initial_state)
    return o, state


def naive_gated_delta_rule_with_read(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    read_q: Tensor | None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The literal loop, also reading every state S_t with ``read_q[..., t, :]`` when given (the reference of
    :func:`hytrec.model.tadn.chunk.chunk_gated_delta_rule_with_read`): (o, o_read or None, final state)."""
    b, h, length, d_k = k.shape
    d_v = v.shape[-1]
    state = initial_state if initial_state is not None else q.new_zeros(b, h, d_v, d_k)
    eye = torch.eye(d_k, dtype=q.dtype, device=q.device)
    outputs, reads = [], []
    rq = read_q if read_q is not None else q  # the loop reads it only when read_q is given
    # unbind once: indexing step t inside the loop would make its backward quadratic in the length
    for q_t, k_t, v_t, g_t, beta_t, r_t in zip(*(x.unbind(2) for x in (q, k, v, g, beta, rq)), strict=True):
        beta_t = beta_t[..., None, None]
        transition = torch.exp(g_t)[..., None, None] * (eye - beta_t * k_t[..., :, None] * k_t[..., None, :])
        state = state @ transition + beta_t * v_t[..., :, None] * k_t[..., None, :]
        outputs.append((state @ q_t[..., None]).squeeze(-1))
        if read_q is not None:
            reads.append((state @ r_t[..., None]).squeeze(-1))
    out = torch.stack(outputs, dim=2) if outputs else v.new_zeros(b, h, 0, d_v)
    read = None
    if read_q is not None:
        read = torch.stack(reads, dim=2) if reads else v.new_zeros(b, h, 0, d_v)
    return out, read, state


def _naive_parallel_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk_size: int = 64, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`naive_gated_delta_rule` with the chunked form's signature (``chunk_size`` is ignored)."""
    return naive_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)


def use_naive_recurrence(model: nn.Module) -> nn.Module:
    """Make every TADN layer of ``model`` run its parallel form through the literal loop, in place; returns it.

    For benchmarking the loop against the chunked form on a whole model; the serving step is unchanged.
    """
    from hytrec.model.layers import TADNLayer  # here, not at the top: layers imports this package

    for module in model.modules():
        if isinstance(module, TADNLayer):
            module.parallel_rule = _naive_parallel_rule
    return model
