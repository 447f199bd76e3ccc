"""The chunked parallel form of the gated delta rule (training), in pure PyTorch.

Inside a chunk of C events, with gamma_t the cumulative log-decay since the chunk start and S_0 the
state entering the chunk, the written values u_t = beta_t (v_t - exp(g_t) S_{t-1} k_t) satisfy

    u_t + sum_{j<t} beta_t exp(gamma_t - gamma_j) (k_t . k_j) u_j = beta_t v_t - beta_t exp(gamma_t) S_0 k_t,

a unit lower-triangular system (the WY / UT transform). Solving it once per chunk for both right-hand
sides gives U = U_v - W S_0^T, after which outputs and the next chunk's state are plain matrix
products; only the (L / C)-step recurrence across chunks is sequential.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Parallel form, identical in value to :func:`hytrec.model.tadn.naive.naive_gated_delta_rule`.

    Any length works: the tail is padded with g = 0, beta = 0, which leaves the state unchanged, so
    the returned final state is the state after the last real event. Right-padded batches of users
    with different lengths work the same way when the caller sets g = beta = 0 on padding.
    Returns (o (B, H, L, d_v), final state (B, H, d_v, d_k)).
    """
    b, h, length, d_k = k.shape
    d_v = v.shape[-1]
    c = max(1, min(chunk_size, length))  # a shorter sequence is one chunk of its own length: no padding
    pad = (-length) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (length + pad) // c
    q, k, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, c), beta.reshape(b, h, n, c)

    gamma = g.cumsum(-1)
    diff = gamma[..., :, None] - gamma[..., None, :]
    ones = torch.ones(c, c, dtype=torch.bool, device=q.device)
    strict, inclusive = torch.tril(ones, -1), torch.tril(ones)
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    decay_strict = torch.where(strict, diff, neg_inf).exp()
    decay_inclusive = torch.where(inclusive, diff, neg_inf).exp()

    # UT transform: (I + M) [W | U_v] = [beta exp(gamma) k | beta v], M strictly lower triangular.
    m = beta[..., :, None] * decay_strict * (k @ k.transpose(-1, -2))
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    rhs = torch.cat([(beta * gamma.exp())[..., None] * k, beta[..., None] * v], dim=-1)
    solved = torch.linalg.solve_triangular(eye + m, rhs, upper=False, unitriangular=True)
    w, u_v = solved[..., :d_k], solved[..., d_k:]

    attn = (q @ k.transpose(-1, -2)) * decay_inclusive  # intra-chunk q_t . k_j exp(gamma_t - gamma_j)
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    state = initial_state if initial_state is not None else q.new_zeros(b, h, d_v, d_k)
    outputs = []
    # unbind once: indexing chunk i inside the loop would make autograd write a full-size zero tensor per chunk
    per_chunk = (t.unbind(2) for t in (u_v, w, q_decayed, attn, chunk_decay, k_to_end))
    for u_v_i, w_i, q_i, attn_i, decay_i, k_i in zip(*per_chunk, strict=True):
        u = u_v_i - w_i @ state.transpose(-1, -2)
        outputs.append(q_i @ state.transpose(-1, -2) + attn_i @ u)
        state = state * decay_i + u.transpose(-1, -2) @ k_i
    out = torch.stack(outputs, dim=2).reshape(b, h, n * c, d_v)[:, :, :length]
    return out, state
