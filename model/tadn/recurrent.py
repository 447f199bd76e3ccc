"""One gated-delta step for many users at once: the serving form (O(d_k d_v) per user and event)."""

from __future__ import annotations

import torch
from torch import Tensor


def recurrent_gated_delta_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Advance ``state`` (B, H, d_v, d_k) by one event; ``q, k`` (B, H, d_k), ``v`` (B, H, d_v), ``g, beta`` (B, H).

    Uses the rank-1 form S' = a S; S = S' + beta (v - S' k) k^T, which equals the equation in
    :mod:`hytrec.model.tadn` without forming a d_k x d_k matrix. Returns (o (B, H, d_v), new state).
    """
    decayed = state * torch.exp(g)[..., None, None]
    predicted = (decayed @ k[..., None]).squeeze(-1)  # matmul, not einsum: half the time at B = 1
    new_state = decayed + (beta[..., None] * (v - predicted))[..., :, None] * k[..., None, :]
    return (new_state @ q[..., None]).squeeze(-1), new_state
