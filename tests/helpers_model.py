"""Small models and synthetic histories shared by the model tests."""

from __future__ import annotations

import torch

from hytrec.model.config import HyTRecConfig
from hytrec.model.hytrec import HyTRec
from hytrec.model.vocab import FIRST_ITEM_ROW


def make_model(variant: str = "hytrec", seed: int = 0, **overrides) -> HyTRec:
    """A model in eval mode with weights large enough that scores are well separated."""
    torch.manual_seed(seed)
    cfg = HyTRecConfig(**{"n_items": 300, "variant": variant, "dropout": 0.0, **overrides})
    model = HyTRec(cfg).eval()
    with torch.no_grad():
        model.item_emb.weight[FIRST_ITEM_ROW:].normal_(0, 1.0)
    return model


def random_history(length: int, n_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item rows and float64 timestamps with sessions, bursts (Delta = 0), huge gaps and out-of-order events."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(FIRST_ITEM_ROW, n_items + FIRST_ITEM_ROW, (length,), generator=gen)
    gaps = torch.exp(torch.randn(length, generator=gen, dtype=torch.float64) * 2.5 + 4.0)
    gaps[torch.rand(length, generator=gen) < 0.2] = 0.0
    gaps[torch.rand(length, generator=gen) < 0.01] = 2e7
    times = 1.6e9 + gaps.cumsum(0)
    back = torch.rand(length, generator=gen) < 0.03
    return items, torch.where(back, times - 4000.0, times)
