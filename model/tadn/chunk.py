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
    o, _, state = _chunked(q, k, v, g, beta, None, chunk_size, initial_state)
    return o, state


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
    """:func:`chunk_gated_delta_rule` plus a second read of every state by other queries: ``read_q``
    (B, H, L, d_k) gives ``S_t read_q_t`` (the state after event t read by a query that is not the layer's
    own, e.g. the short branch's intent at the request time after t). Same value as the naive loop's
    ``read_q`` output. Returns (o, o_read (B, H, L, d_v), final state)."""
    o, o_read, state = _chunked(q, k, v, g, beta, read_q, chunk_size, initial_state)
    assert o_read is not None
    return o, o_read, state


def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    read_q: Tensor | None,
    chunk_size: int,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The chunked recurrence; ``read_q`` (or None) is a second set of queries read against the same states."""
    b, h, length, d_k = k.shape
    d_v = v.shape[-1]
    c = max(1, min(chunk_size, length))  # a shorter sequence is one chunk of its own length: no padding
    pad = (-length) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        read_q = F.pad(read_q, (0, 0, 0, pad)) if read_q is not None else None
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (length + pad) // c
    q, k, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, c), beta.reshape(b, h, n, c)
    if read_q is not None:
        read_q = read_q.reshape(b, h, n, c, d_k)

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
    if read_q is not None:  # the same read-out as q's, for the second queries: r_t = S_t read_q_t
        r_attn = (read_q @ k.transpose(-1, -2)) * decay_inclusive
        r_decayed = read_q * gamma.exp()[..., None]
    else:  # placeholders that the loop never reads
        r_attn, r_decayed = attn, q_decayed
    outputs, reads = [], []
    # unbind once: indexing chunk i inside the loop would make autograd write a full-size zero tensor per chunk
    per_chunk = (t.unbind(2) for t in (u_v, w, q_decayed, attn, chunk_decay, k_to_end, r_decayed, r_attn))
    for u_v_i, w_i, q_i, attn_i, decay_i, k_i, rq_i, r_attn_i in zip(*per_chunk, strict=True):
        u = u_v_i - w_i @ state.transpose(-1, -2)
        outputs.append(q_i @ state.transpose(-1, -2) + attn_i @ u)
        if read_q is not None:
            reads.append(rq_i @ state.transpose(-1, -2) + r_attn_i @ u)
        state = state * decay_i + u.transpose(-1, -2) @ k_i
    out = torch.stack(outputs, dim=2).reshape(b, h, n * c, d_v)[:, :, :length]
    read = torch.stack(reads, dim=2).reshape(b, h, n * c, d_v)[:, :, :length] if read_q is not None else None
    return out, read, state
