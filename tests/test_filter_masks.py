"""The batched mask write and count (``apply_masks``) against a per-row set computation in Python.

Random batches mix rows without a mask, rows with only the shared hidden set, rows with their own ids
(duplicates, overlaps with the hidden and seen items), rows with categories (hidden folded into the union
or kept apart), two different hidden sets in one batch, and seen pairs; the Python-set counter of small
batches, the stamp counter (float32/float64 scores) and its ``unique`` fallback (float16) must give the same
-inf cells and counts.
"""

from __future__ import annotations

import random

import pytest
import torch

from hytrec.model import serving
from hytrec.model.serving import HiddenItems, ItemMask, apply_masks

N, B = 300, 12


def _random_batch(
    rng: random.Random,
) -> tuple[list[ItemMask | None], list[set[int]], tuple[torch.Tensor, torch.Tensor]]:
    hidden_a = HiddenItems.of(rng.sample(range(N), 20), N)
    hidden_b = HiddenItems.of(rng.sample(range(N), 5), N)
    outside = torch.rand(N, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < 0.6
    outside[hidden_a.rows] = True  # the catalogue folds the hidden items into a category union
    keep = (~outside).nonzero().flatten()
    other_outside = torch.zeros(N, dtype=torch.bool)
    other_outside[: N // 2] = True
    masks: list[ItemMask | None] = []
    for _ in range(B):
        own = torch.tensor([rng.randrange(N) for _ in range(rng.randrange(0, 15))], dtype=torch.int64)
        kind = rng.randrange(6)
        if kind == 0:
            masks.append(None)
        elif kind == 1:
            masks.append(ItemMask(torch.zeros(0, dtype=torch.int64), hidden=hidden_a))
        elif kind == 2:
            masks.append(ItemMask(own, hidden=hidden_a))
        elif kind == 3:
            masks.append(ItemMask(own, hidden=hidden_b))
        elif kind == 4:
            masks.append(ItemMask(own, outside, int(outside.sum()), keep))
        else:  # categories with a hidden set kept apart (not folded): both count once
            oo = other_outside
            masks.append(ItemMask(own, oo, int(oo.sum()), (~oo).nonzero().flatten(), hidden=hidden_b))
    seen_rows = torch.tensor([rng.randrange(B) for _ in range(40)], dtype=torch.int64)
    seen_cols = torch.tensor([rng.randrange(N) for _ in range(40)], dtype=torch.int64)
    removed = []
    for i, m in enumerate(masks):
        s = {int(x) for x in seen_cols[seen_rows == i]}
        if m is not None:
            s |= set(m.drop.tolist()) | (set(m.hidden.rows.tolist()) if m.hidden is not None else set())
            if m.outside is not None:
                s |= set(m.outside.nonzero().flatten().tolist())
        removed.append(s)
    return masks, removed, (seen_rows, seen_cols)


@pytest.mark.parametrize("small_pairs", [0, 100_000])  # the torch counter, the Python-set one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_apply_masks_equals_per_row_sets(dtype: torch.dtype, small_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "SMALL_PAIRS", small_pairs)
    rng = random.Random(7)
    for _ in range(30):
        masks, removed, seen = _random_batch(rng)
        scores = torch.randn(B, N).to(dtype)
        scores[seen] = float("-inf")
        counts = apply_masks(scores, masks, seen)
        for i, m in enumerate(masks):
            if m is None:
                assert counts[i] is None
            else:
                assert counts[i] == len(removed[i]), i
            # every written cell is -inf; categories' outside items are left to the top-k (not written)
            written = removed[i] - (
                set(m.outside.nonzero().flatten().tolist()) if m and m.outside is not None else set()
            )
            inf = set(torch.isneginf(scores[i]).nonzero().flatten().tolist())
            own = set(m.drop.tolist()) if m is not None else set()
            assert written <= inf and inf <= removed[i] | own, i
            if m is None or m.outside is None:
                assert inf == removed[i], i
            # a count equals the single-mask reference (ItemMask.count) on the same row
            if m is not None:
                assert counts[i] == m.count(seen[1][seen[0] == i]), i


def test_apply_masks_without_masks_touches_nothing() -> None:
    scores = torch.randn(3, N)
    before = scores.clone()
    assert apply_masks(scores, [None, None, None]) == [None, None, None]
    assert torch.equal(scores, before)


@pytest.mark.parametrize("small_pairs", [0, 100_000])
def test_a_batch_sharing_one_hidden_set_hides_it_in_every_row(
    small_pairs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's case: every row carries the catalogue's one hidden set (one ``index_fill_``)."""
    monkeypatch.setattr(serving, "SMALL_PAIRS", small_pairs)
    hidden = HiddenItems.of([3, 50, 299], N)
    masks: list[ItemMask | None] = [
        ItemMask(torch.tensor([3, 7, 7]), hidden=hidden),
        ItemMask(torch.zeros(0, dtype=torch.int64), hidden=hidden),
    ]
    scores = torch.randn(2, N)
    seen = (torch.tensor([0, 1, 1]), torch.tensor([50, 8, 8]))
    scores[seen] = float("-inf")
    assert apply_masks(scores, masks, seen) == [4, 4]  # {3, 7, 50, 299} and {3, 8, 50, 299}
    assert torch.isneginf(scores).nonzero().tolist() == [
        [0, 3],
        [0, 7],
        [0, 50],
        [0, 299],
        [1, 3],
        [1, 8],
        [1, 50],
        [1, 299],
    ]
