"""The HyTRec model: long branch (TADN stack) + short branch (softmax over the last K) + fusion.

One model, two forms of the same function:

- :meth:`HyTRec.forward` (parallel, training): user vectors at every position of right-padded
  sequences, the request time of position t being ``query_times[:, t]`` (the next event's time);
- :meth:`HyTRec.step` + :meth:`HyTRec.user_vector` (recurrent, serving): advance many users' states
  by one event each, and read a user vector from a state at a request time.

For any history, ``user_vector`` after streaming its events through ``step`` equals ``forward`` at the
last position (tests/test_parity.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hytrec.model.config import HyTRecConfig
from hytrec.model.layers import ItemEmbedding, RMSNorm, TADNBlock, WindowAttentionBlock
from hytrec.model.short_branch import ShortBranch
from hytrec.model.state import StateBatch
from hytrec.model.tadn import time_deltas, time_feature


class LongOut(NamedTuple):
    """What the long branch's parallel pass returns."""

    out: Tensor  # (B, L, d) normalised outputs
    tadn: Tensor  # (B, n_long, H, d_v, d_k) final TADN states
    reads: list[Tensor] | None  # per layer S_t read_q_t (B, L, H, d_v), when queries were given
    hidden: list[Tensor]  # per window block, its inputs (B, L, d) (the serving ring holds the last W)


class IntentRead(nn.Module):
    """The ``hytrec-intent`` read of the long state: the short branch's output s at the request time becomes one
    query per TADN layer, q_l = l2norm(W_l s) d_k^{-1/2} per head (as the layer's own queries), each layer's
    associative memory answers S_l q_l, and the answers (per-head RMSNorm) are projected back to d_model.

    The parallel form gets S_{l,t} q_{l,t} from the chunked pass (:meth:`TADNLayer.forward_read`), serving from
    the stored matrices: the same function, and no new field in the serving state.
    """

    def __init__(self, cfg: HyTRecConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.ModuleList(nn.Linear(cfg.d_model, inner, bias=False) for _ in range(cfg.n_long))
        self.norm = RMSNorm(cfg.head_dim)
        self.out = nn.Linear(cfg.n_long * inner, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def queries(self, s: Tensor) -> list[Tensor]:
        """(..., d) -> one (..., H, d_k) query per TADN layer."""
        shape = (*s.shape[:-1], self.n_heads, self.head_dim)
        return [F.normalize(p(s).view(shape), dim=-1) * self.head_dim**-0.5 for p in self.q_proj]

    def combine(self, reads: list[Tensor]) -> Tensor:
        """Per-layer answers (..., H, d_v) -> (..., d)."""
        return self.dropout(self.out(torch.cat([self.norm(r).flatten(-2) for r in reads], dim=-1)))


class HyTRec(nn.Module):
    def __init__(self, cfg: HyTRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = ItemEmbedding(cfg.n_rows, d)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TADNBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.time_terms, cfg.slow_heads, cfg.slow_half_life)
            for _ in range(cfg.n_long if cfg.uses_long else 0)
        )
        self.window_blocks = nn.ModuleList(
            WindowAttentionBlock(d, cfg.n_heads, cfg.long_window, cfg.ffn_mult, cfg.dropout)
            for _ in range(cfg.window_layers)
        )
        self.long_norm = RMSNorm(d) if cfg.uses_long else None
        self.short = ShortBranch(cfg) if cfg.uses_short else None
        self.fuse = nn.Linear(2 * d + 1, d) if cfg.uses_long and cfg.uses_short else None
        self.intent = IntentRead(cfg) if cfg.reads_state else None

    # ----------------------------------------------------------------------------- shared pieces
    def _fuse(self, long: Tensor | None, short: Tensor | None, gap_phi: Tensor) -> Tensor:
        """User vector from the branches; the gate also sees phi(now - last event)."""
        if long is None or short is None:
            return long if short is None else short
        gate = torch.sigmoid(self.fuse(torch.cat([long, short, gap_phi[..., None]], dim=-1)))
        return gate * long + (1.0 - gate) * short

    def logits(self, user_vectors: Tensor) -> Tensor:
        return self.item_emb.logits(user_vectors)

    def item_scores(self, user_vectors: Tensor) -> Tensor:
        return self.item_emb.item_scores(user_vectors)

    # ----------------------------------------------------------------------------- parallel form
    def encode_long(
        self,
        emb: Tensor,
        times: Tensor,
        valid: Tensor,
        initial_state: Tensor | None = None,
        last_ts: Tensor | None = None,
        read_q: list[Tensor] | None = None,
        prev_hidden: Tensor | None = None,
        prev_count: Tensor | None = None,
    ) -> LongOut:
        """Long branch over (B, L, d): normalised outputs (B, L, d) and final TADN states (B, n_long, H, d, d).

        ``initial_state`` and ``last_ts`` continue a history: the TADN states and latest timestamp before ``emb``.
        ``read_q`` (one (B, L, H, d_k) per layer): also return, third, each layer's states read by them,
        S_{l,t} read_q[l]_t (a list of (B, L, H, d_v)). ``prev_hidden`` (B, n_window_layers, W, d) and
        ``prev_count`` (B,): the window blocks' stored inputs before ``emb`` and how many events came before.
        """
        phi = time_feature(time_deltas(times, last_ts), self.cfg.tau, emb.dtype)
        x, states, reads = emb, [], []
        for i, block in enumerate(self.blocks):
            init = initial_state[:, i] if initial_state is not None else None
            if read_q is None:
                x, s = block(x, phi, valid, initial_state=init, chunk_size=self.cfg.chunk_size)
            else:
                x, s, r = block.forward_read(
                    x, phi, valid, read_q[i], initial_state=init, chunk_size=self.cfg.chunk_size
                )
                reads.append(r)
            states.append(s)
        hidden = []
        w = self.cfg.long_window
        b = emb.shape[0]
        count = prev_count if prev_count is not None else torch.zeros(b, dtype=torch.int64, device=emb.device)
        prev_valid = torch.arange(w, device=emb.device)[None, :] >= w - count.clamp(max=w)[:, None]
        for i, block in enumerate(self.window_blocks):
            prev = prev_hidden[:, i] if prev_hidden is not None else x.new_zeros(b, w, x.shape[-1])
            hidden.append(x)
            x = block(x, valid, prev, prev_valid)
        return LongOut(self.long_norm(x), torch.stack(states, dim=1), reads if read_q is not None else None, hidden)

    def forward(self, items: Tensor, times: Tensor, query_times: Tensor, lengths: Tensor) -> Tensor:
        """User vectors (B, L, d) for right-padded item rows (B, L), times and request times (float64 s)."""
        valid = torch.arange(items.shape[1], device=items.device)[None, :] < lengths[:, None]
        emb = self.emb_dropout(self.item_emb(items))
        gap_phi = time_feature(query_times - torch.cummax(times, dim=-1).values, self.cfg.tau, emb.dtype)
        if self.intent is not None:  # the short branch first (no memory token), then its output reads the states
            short = self.short(emb, times, query_times, gap_phi, None)
            res = self.encode_long(emb, times, valid, read_q=self.intent.queries(short))
            return self._fuse(res.out, short + self.intent.combine(res.reads), gap_phi)
        long = self.encode_long(emb, times, valid).out if self.cfg.uses_long else None
        short = self.short(emb, times, query_times, gap_phi, long) if self.short is not None else None
        return self._fuse(long, short, gap_phi)

    @torch.no_grad()
    def build_state(self, items: Tensor, times: Tensor, lengths: Tensor) -> StateBatch:
        """Serving states of whole histories in one parallel pass (backfill, offline recommend)."""
        return self.extend_state(StateBatch.empty(self.cfg, items.shape[0]), items, times, lengths)

    @torch.no_grad()
    def extend_state(self, state: StateBatch, items: Tensor, times: Tensor, lengths: Tensor) -> StateBatch:
        """Apply each user's next ``lengths[b]`` events (right-padded (B, L) rows and times) to their state in
        one parallel pass, the chunked form starting from the stored TADN states: the same function as
        ``lengths[b]`` calls of :meth:`step`, at the cost of one pass instead of one step per event."""
        b, length = items.shape
        if length == 0:
            return state
        idx = torch.arange(length)[None, :]
        valid = idx < lengths[:, None]
        had = state.count > 0
        fresh = lengths > 0
        out = StateBatch(
            tadn=state.tadn,
            summary=state.summary,
            last_ts=state.last_ts,
            count=state.count + lengths,
            ring_items=state.ring_items,
            ring_ts=state.ring_ts,
            hidden=state.hidden,
        )
        if self.cfg.uses_long:
            last = torch.where(had, state.last_ts, times[:, 0])  # a new user's first gap is 0, as in step
            res = self.encode_long(
                self.item_emb(items), times, valid, state.tadn, last, prev_hidden=state.hidden, prev_count=state.count
            )
            end = res.out[torch.arange(b), (lengths - 1).clamp_min(0)]
            out.tadn, out.summary = res.tadn, torch.where(fresh[:, None], end, state.summary)
            if res.hidden:  # the window blocks' rings: the last W of (stored inputs, new inputs)
                w = self.cfg.long_window
                src = (lengths[:, None] + torch.arange(w)[None, :])[..., None].expand(b, w, self.cfg.d_model)
                out.hidden = torch.stack(
                    [torch.cat([state.hidden[:, i], h], dim=1).gather(1, src) for i, h in enumerate(res.hidden)], dim=1
                )
        newest = torch.where(valid, times, torch.full_like(times, float("-inf"))).max(dim=1).values
        out.last_ts = torch.where(fresh, torch.where(had, torch.maximum(state.last_ts, newest), newest), state.last_ts)
        k = self.cfg.window  # the ring buffer: the last k of (old ring, new events)
        src = lengths[:, None] + torch.arange(k)[None, :]
        out.ring_items = torch.cat([state.ring_items, items], dim=1).gather(1, src)
        out.ring_ts = torch.cat([state.ring_ts, times], dim=1).gather(1, src)
        return out

    # ----------------------------------------------------------------------------- recurrent form
    def step(self, state: StateBatch, items: Tensor, ts: Tensor, active: Tensor | None = None) -> StateBatch:
        """Apply one event to each of B users: item rows (B,), timestamps (B,) float64.

        Users with ``active`` False are returned unchanged. An event older than the user's latest is
        applied with Delta = 0, like the parallel form's running maximum.
        """
        first = state.count == 0
        delta = torch.where(first, 0.0, ts - state.last_ts).clamp_min(0.0)
        x = self.item_emb(items)
        phi = time_feature(delta, self.cfg.tau, x.dtype)
        tadn, summary, hidden = state.tadn, state.summary, state.hidden
        if self.cfg.uses_long:
            layer_states = []
            for i, block in enumerate(self.blocks):
                x, s = block.step(x, phi, state.tadn[:, i])
                layer_states.append(s)
            rings = []
            w = self.cfg.long_window
            valid = torch.arange(w)[None, :] >= w - (state.count + 1).clamp(max=w)[:, None]
            for i, block in enumerate(self.window_blocks):
                ring = torch.cat([state.hidden[:, i, 1:], x[:, None]], dim=1)
                rings.append(ring)
                x = block.attend(x, ring, valid)
            if rings:
                hidden = torch.stack(rings, dim=1)
            tadn, summary = torch.stack(layer_states, dim=1), self.long_norm(x)
        new = StateBatch(
            tadn=tadn,
            summary=summary,
            last_ts=torch.where(first, ts, torch.maximum(state.last_ts, ts)),
            count=state.count + 1,
            ring_items=torch.cat([state.ring_items[:, 1:], items[:, None]], dim=1),
            ring_ts=torch.cat([state.ring_ts[:, 1:], ts[:, None]], dim=1),
            hidden=hidden,
        )
        return new if active is None else new.select(active, state)

    def user_vector(self, state: StateBatch, now: Tensor) -> Tensor:
        """Serving read-out (B, d) at request times ``now`` (B,) float64 (no caching: depends on now)."""
        gap_phi = time_feature(now - state.last_ts, self.cfg.tau, state.summary.dtype)
        long = state.summary if self.cfg.uses_long else None
        short = None
        if self.short is not None:
            ring_emb = self.item_emb(state.ring_items)
            memory = long if self.cfg.memory_token else None
            short = self.short.read(ring_emb, state.ring_items, state.ring_ts, now, gap_phi, memory)
        if self.intent is not None:  # S_l q_l from the stored matrices, q_l from the short branch at `now`
            queries = self.intent.queries(short)
            reads = [(state.tadn[:, i] @ q[..., None]).squeeze(-1) for i, q in enumerate(queries)]
            short = short + self.intent.combine(reads)
        return self._fuse(long, short, gap_phi)
