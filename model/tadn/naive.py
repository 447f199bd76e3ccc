"""The literal step-by-step gated delta rule: slow, obvious, and the reference the tests trust."""

from __future__ import annotations

import torch
from torch import Tensor


def naive_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T with explicit matrices.

    Shapes as in :mod:`hytrec.model.tadn`; returns (o (B, H, L, d_v), final state (B, H, d_v, d_k)).
    """
    b, h, length, d_k = k.shape
    d_v = v.shape[-1]
    state = initial_state if initial_state is not None else q.new_zeros(b, h, d_v, d_k)
    eye = torch.eye(d_k, dtype=q.dtype, device=q.device)
    outputs = []
    # unbind once: indexing step t inside the loop would make its backward quadratic in the length
    for q_t, k_t, v_t, g_t, beta_t in zip(*(x.unbind(2) for x in (q, k, v, g, beta)), strict=True):
        beta_t = beta_t[..., None, None]
        transition = torch.exp(g_t)[..., None, None] * (eye - beta_t * k_t[..., :, None] * k_t[..., None, :])
        state = state @ transition + beta_t * v_t[..., :, None] * k_t[..., None, :]
        outputs.append((state @ q_t[..., None]).squeeze(-1))
    out = torch.stack(outputs, dim=2) if outputs else v.new_zeros(b, h, 0, d_v)
    return out, state
