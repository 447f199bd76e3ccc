"""SASRec+ baseline: a causal softmax transformer over the last ``max_len`` events (Kang & McAuley 2018,
trained with full cross-entropy as in Klenitskiy & Vasilev 2023). Same call signature as HyTRec."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hytrec.model.layers import FeedForward, ItemEmbedding
from hytrec.model.vocab import FIRST_ITEM_ROW


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    ffn_mult: int = 4
    dropout: float = 0.2

    @property
    def n_rows(self) -> int:
        return self.n_items + FIRST_ITEM_ROW

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SASRecConfig:
        return cls(**data)


class CausalSelfAttentionBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout_p = n_heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = FeedForward(d, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(b, length, d)))
        return x + self.ffn(self.norm2(x))


class SASRec(nn.Module):
    """Right-padded input; causal attention means padding after a user's events never reaches them."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = ItemEmbedding(cfg.n_rows, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, items: Tensor, times: Tensor, query_times: Tensor, lengths: Tensor) -> Tensor:
        """User vectors (B, L, d); times are ignored (SASRec has no notion of time), L <= max_len."""
        length = items.shape[1]
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds SASRec max_len {self.cfg.max_len}")
        x = self.item_emb(items) * self.cfg.d_model**0.5 + self.pos_emb.weight[:length]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits(self, user_vectors: Tensor) -> Tensor:
        return self.item_emb.logits(user_vectors)

    def item_scores(self, user_vectors: Tensor) -> Tensor:
        return self.item_emb.item_scores(user_vectors)
