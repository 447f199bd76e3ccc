"""Building blocks of the long branch: RMSNorm, FFN and the TADN layer / block.

A TADN layer turns its input into q, k, v and the time-aware gates in one place
(:meth:`TADNLayer.project`) and reads its output in one place (:meth:`TADNLayer.read_out`); the
parallel (chunked) and the recurrent (one event) forms differ only in the recurrence they call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hytrec.model.tadn import chunk_gated_delta_rule, chunk_gated_delta_rule_with_read, recurrent_gated_delta_step
from hytrec.model.vocab import FIRST_ITEM_ROW, PAD_ROW


class ItemEmbedding(nn.Embedding):
    """The item table shared by inputs and scoring: row 0 padding (zero), row 1 unknown, then the catalogue."""

    def __init__(self, n_rows: int, dim: int) -> None:
        super().__init__(n_rows, dim, padding_idx=PAD_ROW)
        nn.init.normal_(self.weight, std=0.02)
        with torch.no_grad():
            self.weight[PAD_ROW].zero_()

    def logits(self, user_vectors: Tensor) -> Tensor:
        """Scores over every item row (..., n_rows); padding and unknown rows are -inf."""
        scores = user_vectors @ self.weight.T
        scores[..., :FIRST_ITEM_ROW] = float("-inf")
        return scores

    def item_scores(self, user_vectors: Tensor) -> Tensor:
        """Scores over the catalogue only (..., n_items): column i is item row i + FIRST_ITEM_ROW."""
        return user_vectors @ self.weight[FIRST_ITEM_ROW:].T


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, dim * mult)
        self.down = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class TADNLayer(nn.Module):
    """Temporal-Aware Delta Network layer (docs/model.md, "TADN").

    log-decay g = -exp(A_h) softplus(w_a x + b_h) - lambda_h phi(Delta), lambda_h = softplus(.) >= 0;
    write strength beta = sigmoid(w_b x + mu_h phi(Delta)); q, k L2-normalised; output through a
    per-head RMSNorm gated by silu(W_g x), then W_o. ``time_terms=False`` drops the phi terms.
    ``slow_heads``: the last that many heads keep g >= ln(0.5) / ``slow_half_life`` (their state halves at most
    every ``slow_half_life`` events, whatever the input and the gap), a floor on forgetting for long memory.
    """

    # The recurrence of the parallel form. Only :func:`hytrec.model.tadn.naive.use_naive_recurrence` replaces it
    # (per instance, for the benchmark of the literal loop), so no production signature carries a reference switch.
    parallel_rule: Callable[..., tuple[Tensor, Tensor]] = staticmethod(chunk_gated_delta_rule)

    def __init__(
        self, d_model: int, n_heads: int, time_terms: bool = True, slow_heads: int = 0, slow_half_life: float = 1e3
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.time_terms = time_terms
        floor = torch.full((n_heads,), -math.inf)
        if slow_heads:
            floor[n_heads - slow_heads :] = math.log(0.5) / slow_half_life
        self.register_buffer("g_floor", floor, persistent=False)  # from the config, not a weight
        self.floored = slow_heads > 0
        inner = n_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.a_proj = nn.Linear(d_model, n_heads)  # its bias is b_h
        self.b_proj = nn.Linear(d_model, n_heads)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_norm = RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        # A_h spread over heads so that heads forget at different rates (as in Mamba / Gated DeltaNet).
        self.a_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, n_heads)) - math.log(16.0))
        self.lambda_raw = nn.Parameter(torch.full((n_heads,), -3.0))  # softplus(-3) ~ 0.05 per unit phi
        self.mu = nn.Parameter(torch.zeros(n_heads))

    def project(self, x: Tensor, dt_feature: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (..., d), phi(Delta) (...) -> q, k (..., H, d_k), v (..., H, d_v), g, beta (..., H)."""
        shape = (*x.shape[:-1], self.n_heads, self.head_dim)
        q = F.normalize(self.q_proj(x).view(shape), dim=-1) * self.head_dim**-0.5
        k = F.normalize(self.k_proj(x).view(shape), dim=-1)
        v = self.v_proj(x).view(shape)
        g = -torch.exp(self.a_log) * F.softplus(self.a_proj(x))
        beta_logit = self.b_proj(x)
        if self.time_terms:
            phi = dt_feature[..., None]
            g = g - F.softplus(self.lambda_raw) * phi
            beta_logit = beta_logit + self.mu * phi
        if self.floored:
            g = torch.maximum(g, self.g_floor.to(g.dtype))
        return q, k, v, g, torch.sigmoid(beta_logit)

    def read_out(self, o: Tensor, x: Tensor) -> Tensor:
        """o (..., H, d_v) -> gated RMSNorm -> W_o -> (..., d)."""
        gate = F.silu(self.g_proj(x)).view(o.shape)
        return self.o_proj((self.o_norm(o) * gate).flatten(-2))

    def forward(
        self,
        x: Tensor,
        dt_feature: Tensor,
        valid: Tensor,
        initial_state: Tensor | None = None,
        chunk_size: int = 64,
    ) -> tuple[Tensor, Tensor]:
        """Parallel form over (B, L, d); padding (``valid`` False) leaves the state untouched."""
        q, k, v, g, beta = self.project(x, dt_feature)
        g = torch.where(valid[..., None], g, torch.zeros_like(g))
        beta = torch.where(valid[..., None], beta, torch.zeros_like(beta))
        heads_first = [t.transpose(1, 2) for t in (q, k, v, g, beta)]
        o, state = self.parallel_rule(*heads_first, chunk_size=chunk_size, initial_state=initial_state)
        return self.read_out(o.transpose(1, 2), x), state

    def forward_read(
        self,
        x: Tensor,
        dt_feature: Tensor,
        valid: Tensor,
        read_q: Tensor,
        initial_state: Tensor | None = None,
        chunk_size: int = 64,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` plus ``S_t read_q_t`` (B, L, H, d_v) for outside queries ``read_q`` (B, L, H, d_k):
        the state after each event read by another query (always the chunked form)."""
        q, k, v, g, beta = self.project(x, dt_feature)
        g = torch.where(valid[..., None], g, torch.zeros_like(g))
        beta = torch.where(valid[..., None], beta, torch.zeros_like(beta))
        heads_first = [t.transpose(1, 2) for t in (q, k, v, g, beta, read_q)]
        o, o_read, state = chunk_gated_delta_rule_with_read(
            *heads_first, chunk_size=chunk_size, initial_state=initial_state
        )
        return self.read_out(o.transpose(1, 2), x), state, o_read.transpose(1, 2)

    def step(self, x: Tensor, dt_feature: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Recurrent form: one event for each of B users; x (B, d), state (B, H, d_v, d_k)."""
        q, k, v, g, beta = self.project(x, dt_feature)
        o, state = recurrent_gated_delta_step(q, k, v, g, beta, state)
        return self.read_out(o, x), state


class TADNBlock(nn.Module):
    """Pre-norm TADN + residual, then pre-norm FFN + residual."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn_mult: int,
        dropout: float,
        time_terms: bool,
        slow_heads: int = 0,
        slow_half_life: float = 1e3,
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.tadn = TADNLayer(d_model, n_heads, time_terms, slow_heads, slow_half_life)
        self.ffn = FeedForward(d_model, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, dt_feature: Tensor, valid: Tensor, **kw) -> tuple[Tensor, Tensor]:
        y, state = self.tadn(self.norm1(x), dt_feature, valid, **kw)
        x = x + self.dropout(y)
        return x + self.ffn(self.norm2(x)), state

    def forward_read(
        self, x: Tensor, dt_feature: Tensor, valid: Tensor, read_q: Tensor, **kw
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, state, read = self.tadn.forward_read(self.norm1(x), dt_feature, valid, read_q, **kw)
        x = x + self.dropout(y)
        return x + self.ffn(self.norm2(x)), state, read

    def step(self, x: Tensor, dt_feature: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        y, state = self.tadn.step(self.norm1(x), dt_feature, state)
        x = x + self.dropout(y)
        return x + self.ffn(self.norm2(x)), state


class WindowAttentionBlock(nn.Module):
    """Pre-norm softmax attention of each position over its last W hidden states (itself included), with a
    learned per-head bias per offset, + residual, then pre-norm FFN + residual (the ``hytrec-hybrid`` long
    branch's softmax block). Its input at an event depends only on that event and earlier ones, so serving
    keeps a ring of the last W inputs and evaluates the same function once per event."""

    def __init__(self, d_model: int, n_heads: int, window: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, d_model // n_heads, window
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_model) for _ in range(3))
        self.o_proj = nn.Linear(d_model, d_model)
        self.pos_bias = nn.Parameter(torch.zeros(window, n_heads))
        self.ffn = FeedForward(d_model, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

    def attend(self, x: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
        """x (..., d) queries; keys (..., W, d) the window of inputs ending with x itself, oldest first;
        valid (..., W). Returns the block's output (..., d)."""
        kn = self.norm1(keys)
        return self._attend_kv(x, self._heads(self.k_proj(kn)), self._heads(self.v_proj(kn)), valid)

    def _attend_kv(self, x: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        """``attend`` given the window's projected keys and values k, v (..., W, H, d_h)."""
        q = self._heads(self.q_proj(self.norm1(x)))
        scores = torch.einsum("...hd,...jhd->...hj", q, k) * self.head_dim**-0.5
        scores = scores + self.pos_bias.flip(0).T  # slot j of W holds the event W - 1 - j back
        scores = scores.masked_fill(~valid[..., None, :], float("-inf"))
        out = torch.einsum("...hj,...jhd->...hd", torch.softmax(scores, dim=-1), v).flatten(-2)
        y = x + self.dropout(self.o_proj(out))
        return y + self.ffn(self.norm2(y))

    def forward(self, x: Tensor, valid: Tensor, prev: Tensor, prev_valid: Tensor) -> Tensor:
        """Parallel form over (B, L, d) continuing ``prev`` (B, W, d), the inputs of the W events before x
        (``prev_valid`` (B, W) marks the slots that hold one); ``valid`` (B, L) marks real events.

        The same function as ``attend`` on every window, computed blockwise for speed: norm and key/value
        projections act on each position once, and each block of W queries attends to the 2W keys of its own
        and the previous block with a band mask (offsets 0 .. W-1), in two batched matmuls. A query always
        sees itself, so a padding position gets a finite output instead of a softmax over nothing."""
        w, (b, n, d) = self.window, x.shape
        n_blocks = -(-n // w)
        pad = n_blocks * w - n
        xp = F.pad(x, (0, 0, 0, pad))
        full = torch.cat([prev, xp], dim=1)  # (B, W + n_blocks W, d): query t sits at position W + t
        ok = torch.cat([prev_valid, F.pad(valid, (0, pad))], dim=1).view(b, n_blocks + 1, w)
        kn = self.norm1(full)
        k = self._heads(self.k_proj(kn)).view(b, n_blocks + 1, w, self.n_heads, self.head_dim)
        v = self._heads(self.v_proj(kn)).view(b, n_blocks + 1, w, self.n_heads, self.head_dim)
        k, v = torch.cat([k[:, :-1], k[:, 1:]], dim=2), torch.cat([v[:, :-1], v[:, 1:]], dim=2)  # (B, C, 2W, H, dh)
        ok = torch.cat([ok[:, :-1], ok[:, 1:]], dim=2)  # (B, C, 2W)
        q = self._heads(self.q_proj(self.norm1(xp))).view(b, n_blocks, w, self.n_heads, self.head_dim)
        scores = torch.einsum("bcihd,bcjhd->bchij", q, k) * self.head_dim**-0.5
        i, j = torch.arange(w, device=x.device)[:, None], torch.arange(2 * w, device=x.device)[None, :]
        offset = w + i - j  # how many events key j lies before query i
        band = (offset >= 0) & (offset < w)
        scores = scores + self.pos_bias[offset.clamp(0, w - 1)].permute(2, 0, 1)  # (H, W, 2W)
        allowed = (band & ok[:, :, None, None, :]) | (offset == 0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("bchij,bcjhd->bcihd", torch.softmax(scores, dim=-1), v).reshape(b, n_blocks * w, d)[:, :n]
        y = x + self.dropout(self.o_proj(out))
        return y + self.ffn(self.norm2(y))
