"""The short branch: softmax attention from the latest event over the last K events.

Position t's output is a function of exactly: the items and timestamps of its window (events
t-K+1..t), the request time ``now`` and the long-branch summary at t (an extra memory token). Time
enters as additive logit biases (a learned bias per head for the event's log-scaled age ``now - t_j``
and one for its position in the window), so keys and values are per-event and the parallel form is a
banded attention over blocks of K queries, while serving evaluates the same function once over the
ring buffer. :meth:`ShortBranch.attend` is the one place where the attention is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hytrec.model.config import HyTRecConfig
from hytrec.model.layers import FeedForward
from hytrec.model.tadn import time_feature
from hytrec.model.vocab import PAD_ROW


class _SmallTableLookup(torch.autograd.Function):
    """``table[index]`` whose backward is one ``index_add_`` (embedding's CPU backward sorts the indices:
    ~12x slower for the ~10^6 age-bucket lookups of a training batch into a 64-row table)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        flat = grad.reshape(index.numel(), -1)
        table_grad = flat.new_zeros(ctx.rows, flat.shape[1]).index_add_(0, index.reshape(-1), flat)
        return table_grad.view(ctx.rows, *grad.shape[index.dim() :]), None


def small_table_lookup(table: Tensor, index: Tensor) -> Tensor:
    """Rows of ``table`` (R, ...) at integer ``index`` (any shape): (*index.shape, ...)."""
    return _SmallTableLookup.apply(table, index)


class ShortBranch(nn.Module):
    def __init__(self, cfg: HyTRecConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.short_heads
        self.head_dim, self.window, self.tau = d // cfg.short_heads, cfg.window, cfg.tau
        self.age_buckets, self.age_scale = cfg.age_buckets, cfg.age_bucket_scale
        self.token_norm = nn.LayerNorm(d)
        self.gap_proj = nn.Linear(1, d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.use_memory = cfg.memory_token
        if self.use_memory:
            self.mem_k, self.mem_v = nn.Linear(d, d), nn.Linear(d, d)
            self.mem_bias = nn.Parameter(torch.zeros(cfg.short_heads))
        self.age_bias = nn.Embedding(cfg.age_buckets, cfg.short_heads)
        nn.init.zeros_(self.age_bias.weight)
        self.pos_bias = nn.Parameter(torch.zeros(cfg.window, cfg.short_heads))
        self.o_proj = nn.Linear(d, d)
        self.ffn_norm, self.out_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

    def _bias(self, age_seconds: Tensor, offset: Tensor) -> Tensor:
        """Logit bias (..., H) for an event of the given age (s) at ``offset`` events before the query."""
        phi = time_feature(age_seconds, self.tau, torch.float64)
        bucket = (phi * self.age_scale).floor().clamp(0, self.age_buckets - 1).long()
        return small_table_lookup(self.age_bias.weight, bucket) + self.pos_bias[offset.clamp(0, self.window - 1)]

    def attend(
        self,
        query_token: Tensor,
        keys_emb: Tensor,
        keys_ts: Tensor,
        now: Tensor,
        offset: Tensor,
        valid: Tensor,
        gap_phi: Tensor,
        memory: Tensor | None,
    ) -> Tensor:
        """Attention of I queries over J keys per group (B, N groups).

        query_token (B, N, I, d) embeddings of each query's own event; keys_emb (B, N, J, d), keys_ts
        (B, N, J); now, gap_phi (B, N, I); offset (I, J) or (B, N, I, J) events between key and query;
        valid (B, N, I, J); memory (B, N, I, d) long summary or None. Returns (B, N, I, d).
        """
        z_q = self.token_norm(query_token) + self.gap_proj(gap_phi[..., None])
        q = self._heads(self.q_proj(z_q))
        z_k = self.token_norm(keys_emb)
        k, v = self._heads(self.k_proj(z_k)), self._heads(self.v_proj(z_k))
        scale = self.head_dim**-0.5
        age = (now[..., :, None] - keys_ts[..., None, :]).clamp_min(0.0)
        scores = torch.einsum("bnihd,bnjhd->bnhij", q, k) * scale
        scores = scores + self._bias(age, offset).movedim(-1, 2)
        scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        if self.use_memory and memory is not None:
            mk, mv = self._heads(self.mem_k(memory)), self._heads(self.mem_v(memory))
            mem_score = (q * mk).sum(-1) * scale + self.mem_bias  # (B, N, I, H)
            scores = torch.cat([mem_score.movedim(-1, 2)[..., None], scores], dim=-1)
        attn = torch.softmax(scores, dim=-1)  # no dropout here: sampling a mask this size costs ~8% of a step
        if self.use_memory and memory is not None:
            out = attn[..., 0].movedim(2, -1)[..., None] * mv
            attn = attn[..., 1:]
        else:
            out = 0.0
        out = out + torch.einsum("bnhij,bnjhd->bnihd", attn, v)
        x = z_q + self.dropout(self.o_proj(out.flatten(-2)))
        return self.out_norm(x + self.ffn(self.ffn_norm(x)))

    def forward(
        self, emb: Tensor, times: Tensor, query_times: Tensor, gap_phi: Tensor, memory: Tensor | None
    ) -> Tensor:
        """Parallel (banded) form over a right-padded batch: emb (B, L, d), times (B, L) -> (B, L, d)."""
        b, length, d = emb.shape
        w = max(1, min(self.window, length))  # blocks of w queries; a sequence shorter than K is one block
        pad = (-length) % w
        if pad:
            emb = F.pad(emb, (0, 0, 0, pad))
            times, query_times = F.pad(times, (0, pad)), F.pad(query_times, (0, pad))
            gap_phi = F.pad(gap_phi, (0, pad))
            memory = F.pad(memory, (0, 0, 0, pad)) if memory is not None else None
        n = (length + pad) // w

        def blocks(x: Tensor) -> Tensor:
            return x.reshape(b, n, w, *x.shape[2:])

        def with_previous(x: Tensor) -> Tensor:  # keys of block i: blocks i-1 and i (2w events)
            x = blocks(x)
            return torch.cat([F.pad(x[:, :-1], (0,) * (2 * (x.dim() - 2)) + (1, 0)), x], dim=2)

        i = torch.arange(w, device=emb.device)
        j = torch.arange(2 * w, device=emb.device)
        offset = w + i[:, None] - j[None, :]  # events from key j to query i
        in_band = (offset >= 0) & (offset < w)
        first_block = (torch.arange(n, device=emb.device) == 0)[:, None, None] & (j < w)[None, None, :]
        valid = (in_band[None] & ~first_block).expand(b, n, w, 2 * w)
        out = self.attend(
            blocks(emb),
            with_previous(emb),
            with_previous(times),
            blocks(query_times),
            offset,
            valid,
            blocks(gap_phi),
            blocks(memory) if memory is not None else None,
        )
        return out.reshape(b, n * w, d)[:, :length]

    def read(
        self, ring_emb: Tensor, ring_items: Tensor, ring_ts: Tensor, now: Tensor, gap_phi: Tensor, memory: Tensor | None
    ) -> Tensor:
        """Serving form over the ring buffer (B, K), newest event last, empty slots = padding row."""
        k = ring_items.shape[1]
        offset = (k - 1 - torch.arange(k, device=ring_emb.device))[None, :]
        valid = (ring_items != PAD_ROW)[:, None, None, :]
        out = self.attend(
            ring_emb[:, None, -1:],
            ring_emb[:, None],
            ring_ts[:, None],
            now[:, None, None],
            offset,
            valid,
            gap_phi[:, None, None],
            memory[:, None, None] if memory is not None else None,
        )
        return out[:, 0, 0]
