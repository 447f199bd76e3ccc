"""Full-ranking metrics and the paired bootstrap (training/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hytrec.training.metrics import (
    exclusion_mask,
    paired_bootstrap,
    paired_bootstrap_ratio,
    per_user_metrics,
    summarize,
    target_ranks,
)

# Rows 0 (padding) and 1 (unknown) are never ranked; items are rows 2..7.
SCORES = np.array(
    [
        [99.0, 99.0, 0.5, 0.9, 0.1, 0.7, 0.8, 0.2],  # target row 5 (0.7): rows 3 (0.9), 6 (0.8) above -> rank 2
        [99.0, 99.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # all tied, target row 2
    ]
)


def test_rank_counts_higher_items_and_ignores_special_rows() -> None:
    # rows 0 and 1 score 99 but are never ranked; row 3 (0.9) is the top item
    assert target_ranks(SCORES[[0, 0]], [5, 3]).tolist() == [2, 0]
    assert target_ranks(torch.tensor(SCORES[[0, 0]]), torch.tensor([5, 3])).tolist() == [2, 0]


def test_tie_modes_default_pessimistic() -> None:
    # the all-tied row: the default ranks the target below its 5 equals, so a constant scorer gets no credit
    assert target_ranks(SCORES, [5, 2]).tolist() == [2, 5]
    assert target_ranks(SCORES, [5, 2], ties="pessimistic").tolist() == [2, 5]
    assert target_ranks(SCORES, [5, 2], ties="optimistic").tolist() == [2, 0]
    assert target_ranks(SCORES, [5, 2], ties="mean").tolist() == [2, 2]
    with pytest.raises(ValueError):
        target_ranks(SCORES, [5, 2], ties="random")


def test_exclusion_changes_rank_and_never_excludes_target() -> None:
    # excluding row 3 (0.9, seen) lifts the target from rank 2 to rank 1
    assert target_ranks(SCORES[:1], [5], exclude=[[3]]).tolist() == [1]
    assert target_ranks(SCORES[:1], [5], exclude=[[3, 6]]).tolist() == [0]
    # the target itself in the exclusion list (a re-consumed item) is still ranked, not dropped
    assert target_ranks(SCORES[:1], [5], exclude=[[5]]).tolist() == [2]
    assert target_ranks(SCORES[:1], [5], exclude=[[3, 5]]).tolist() == [1]
    assert target_ranks(SCORES[:1], [5], exclude=[[3, 5]], ties="optimistic").tolist() == [1]
    # excluded items never count as ties either: 5 equals, 2 of them excluded
    assert target_ranks(SCORES[1:], [2], exclude=[[3, 4]]).tolist() == [3]
    # boolean masks, numpy or torch, behave the same
    mask = exclusion_mask([[3, 5], []], 8)
    assert mask.dtype == torch.bool and mask.sum().item() == 2
    assert target_ranks(SCORES, [5, 2], exclude=mask).tolist() == [1, 5]
    assert target_ranks(SCORES, [5, 2], exclude=mask.numpy()).tolist() == [1, 5]
    assert target_ranks(SCORES, [5, 2], exclude=[np.array([3, 5]), np.array([], dtype=np.int64)]).tolist() == [1, 5]
    with pytest.raises(ValueError):
        target_ranks(SCORES, [5, 2], exclude=np.zeros((2, 3), dtype=bool))


def test_misses_and_bad_input() -> None:
    s = SCORES.copy()
    s[0, 5] = np.nan
    s[1, 4] = np.nan  # a NaN non-target never ranks above, nor ties
    assert target_ranks(s, [5, 2], ties="optimistic").tolist() == [6, 0]
    assert target_ranks(s, [5, 2]).tolist() == [6, 4]
    assert target_ranks(SCORES, [1, 0]).tolist() == [6, 6]  # unknown / padding target: miss
    with pytest.raises(ValueError):
        target_ranks(SCORES, [8, 2])
    with pytest.raises(ValueError):
        target_ranks(SCORES, [5])


def test_hr_ndcg_exact_values() -> None:
    m = per_user_metrics(np.array([0, 2, 9, 10, 49, 50, 499, 500]))
    assert m["HR@10"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert m["HR@50"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert m["HR@500"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert m["NDCG@10"][0] == 1.0
    assert m["NDCG@10"][1] == pytest.approx(1 / math.log2(4)) == 0.5
    assert m["NDCG@10"][2] == pytest.approx(1 / math.log2(11))
    assert m["NDCG@10"][3] == 0.0 and m["NDCG@50"][3] == pytest.approx(1 / math.log2(12))
    assert m["NDCG@500"][6] == pytest.approx(1 / math.log2(501)) and m["NDCG@500"][7] == 0.0
    assert set(m) == {f"{x}@{k}" for x in ("HR", "NDCG") for k in (10, 50, 500)}


def test_end_to_end_from_scores() -> None:
    ranks = target_ranks(SCORES[[0, 0]], [5, 3])  # ranks 2 and 0
    m = per_user_metrics(ranks, ks=(1, 10))
    assert m["HR@1"].tolist() == [0, 1] and m["NDCG@10"].tolist() == [0.5, 1.0]


def test_summarize_overall_and_buckets() -> None:
    per_user = {"HR@10": np.array([1.0, 0.0, 1.0, 1.0]), "NDCG@10": np.array([0.5, 0.0, 1.0, 0.25])}
    out = summarize(per_user, buckets=np.array([0, 0, 1, 3]))
    assert out["all"] == {"n": 4.0, "HR@10": 0.75, "NDCG@10": 0.4375}
    assert out["<100"] == {"n": 2.0, "HR@10": 0.5, "NDCG@10": 0.25}
    assert out["100-499"]["n"] == 1 and out[">=1000"]["NDCG@10"] == 0.25
    assert out["500-999"]["n"] == 0 and math.isnan(out["500-999"]["HR@10"])
    assert list(summarize(per_user)) == ["all"]


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.3).astype(float)
    mean, lo, hi = paired_bootstrap(a, a.copy(), n=500, seed=1)
    assert mean == 0 and lo <= 0 <= hi
    noisy_b = (rng.random(2000) < 0.3).astype(float)
    mean, lo, hi = paired_bootstrap(a, noisy_b, n=500, seed=1)
    assert lo < mean < hi and lo < 0.05 and hi > -0.05
    better = np.maximum(a, (rng.random(2000) < 0.3).astype(float))  # clearly higher, paired
    mean, lo, hi = paired_bootstrap(better, a, n=500, seed=1)
    assert lo > 0 and lo <= mean <= hi
    assert paired_bootstrap(better, a, n=500, seed=1) == (mean, lo, hi)  # seeded
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:-1])


def test_paired_bootstrap_ratio() -> None:
    rng = np.random.default_rng(0)
    b = (rng.random(3000) < 0.3).astype(float)
    r, lo, hi = paired_bootstrap_ratio(b, b.copy(), n=300, seed=0)
    assert r == 1.0 and lo <= 1.0 <= hi
    a = np.maximum(b, (rng.random(3000) < 0.2).astype(float))  # about 1.47x
    r, lo, hi = paired_bootstrap_ratio(a, b, n=300, seed=0)
    assert lo > 1.08 and lo <= r <= hi


def test_paired_bootstrap_ratio_upper_bound_is_inf_when_the_baseline_can_vanish() -> None:
    # 2 hits of the baseline among 20 users: some resamples hold none of them, so mean(b) == 0 there
    b = np.zeros(20)
    b[:2] = 1.0
    a = np.ones(20)
    _, _, hi = paired_bootstrap_ratio(a, b, n=500, seed=0)
    assert hi == np.inf
