"""Full-ranking metrics (HR@k, NDCG@k), per-bucket aggregation and paired bootstrap confidence intervals.

Conventions:

- Score matrices are ``(B, n_rows)`` over vocabulary rows (:class:`hytrec.model.vocab.Vocab`); the columns
  below ``FIRST_ITEM_ROW`` (padding, unknown) are never ranked.
- rank = number of candidate items scoring above the target (0 = top). By default ties count against the
  target (pessimistic: other items with an equal score rank above it), so a degenerate model giving every
  item the same score ranks every target last instead of first; ``ties="optimistic"`` (strictly above only)
  and ``"mean"`` are there for comparisons. NaN scores never rank above the target; a NaN target score, or a
  target row below ``FIRST_ITEM_ROW`` (e.g. an unknown item), counts as a miss.
- Excluded items (already seen) are simply not counted; the target itself is never excluded, even if it
  appears among the excluded rows (a re-consumed item is a valid target).
- HR@k = 1 if rank < k; NDCG@k = 1 / log2(rank + 2) if rank < k, else 0 (one relevant item).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hytrec.model.vocab import FIRST_ITEM_ROW
from hytrec.training.data import BUCKET_LABELS

KS: tuple[int, ...] = (10, 50, 500)


def _as_tensor(x: Any, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if device is None else t.to(device)


def exclusion_mask(
    rows: Sequence[Sequence[int] | np.ndarray], n_rows: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean ``(B, n_rows)`` mask with True at ``rows[b]`` for each user ``b`` (e.g. the seen items)."""
    mask = torch.zeros((len(rows), n_rows), dtype=torch.bool, device=device)
    lens = [len(r) for r in rows]
    if sum(lens):
        cols = torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))
        users = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lens))
        mask[users.to(mask.device), cols.to(mask.device)] = True
    return mask


def target_ranks(
    scores: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray | Sequence[int],
    exclude: torch.Tensor | np.ndarray | Sequence[Sequence[int] | np.ndarray] | None = None,
    *,
    ties: str = "pessimistic",
) -> np.ndarray:
    """Rank (int64, 0-based) of each target among the candidate items; see the module docstring.

    ``ties``: ``"pessimistic"`` (default, what evaluation reports: count items scoring strictly above the
    target and the other items with an equal score), ``"optimistic"`` (strictly above only) or ``"mean"``
    (strictly above plus half the equal ones, rounded down).

    ``exclude``: a boolean ``(B, n_rows)`` mask, or one sequence of rows per user, of items not to rank.
    Computed in torch on the scores' device; returns a numpy array of shape ``(B,)``.
    """
    s = _as_tensor(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (B, n_rows), got shape {tuple(s.shape)}")
    n_users, n_rows = s.shape
    tgt = _as_tensor(targets, s.device).to(torch.int64).reshape(-1)
    if tgt.numel() != n_users:
        raise ValueError(f"{tgt.numel()} targets for {n_users} score rows")
    if ((tgt < 0) | (tgt >= n_rows)).any():
        raise ValueError(f"targets must lie in [0, {n_rows})")
    t_score = s.gather(1, tgt[:, None])
    if ties not in ("optimistic", "pessimistic", "mean"):
        raise ValueError(f"ties must be optimistic, pessimistic or mean, got {ties!r}")
    above = s > t_score
    above[:, :FIRST_ITEM_ROW] = False
    equal = None
    if ties != "optimistic":
        equal = s == t_score
        equal[:, :FIRST_ITEM_ROW] = False
        equal[torch.arange(n_users, device=s.device), tgt] = False
    if exclude is not None:
        is_mask = (isinstance(exclude, torch.Tensor) and exclude.dtype == torch.bool) or (
            isinstance(exclude, np.ndarray) and exclude.dtype == np.bool_
        )
        if is_mask:
            mask = _as_tensor(exclude, s.device)
            if tuple(mask.shape) != (n_users, n_rows):
                raise ValueError(f"exclude mask must be {(n_users, n_rows)}, got {tuple(mask.shape)}")
        else:
            mask = exclusion_mask(exclude, n_rows, s.device)  # type: ignore[arg-type]
        above &= ~mask
        if equal is not None:
            equal &= ~mask
    ranks = above.sum(dim=1)
    if equal is not None:
        n_equal = equal.sum(dim=1)
        ranks = ranks + (n_equal if ties == "pessimistic" else n_equal // 2)
    miss = torch.isnan(t_score[:, 0]) | (tgt < FIRST_ITEM_ROW)
    ranks = torch.where(miss, torch.full_like(ranks, max(n_rows - FIRST_ITEM_ROW, 0)), ranks)
    return ranks.cpu().numpy().astype(np.int64)


def per_user_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-user ``HR@k`` and ``NDCG@k`` (float64 arrays) for each k, from 0-based ranks."""
    r = np.asarray(ranks, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    gain = 1.0 / np.log2(r + 2.0)
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = hit.astype(np.float64)
        out[f"NDCG@{k}"] = np.where(hit, gain, 0.0)
    return out


def summarize(
    per_user: dict[str, np.ndarray],
    buckets: np.ndarray | None = None,
    labels: Sequence[str] = BUCKET_LABELS,
) -> dict[str, dict[str, float]]:
    """Means of each per-user metric, overall (key ``"all"``) and per bucket (keys ``labels``).

    Each group also has ``"n"``, its number of users (empty buckets are reported with n = 0 and NaN means).
    """
    n = len(next(iter(per_user.values()))) if per_user else 0
    groups: dict[str, np.ndarray] = {"all": np.ones(n, dtype=bool)}
    if buckets is not None:
        b = np.asarray(buckets)
        for i, label in enumerate(labels):
            groups[label] = b == i
    out: dict[str, dict[str, float]] = {}
    for name, sel in groups.items():
        m = int(sel.sum())
        row = {"n": float(m)}
        for key, values in per_user.items():
            row[key] = float(np.mean(values[sel])) if m else float("nan")
        out[name] = row
    return out


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Mean of ``a - b`` (per-user metrics of two models on the same users) and its percentile bootstrap
    ``1 - alpha`` confidence interval, resampling users with replacement: ``(mean_diff, lo, hi)``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError("a and b must be non-empty 1-D arrays of the same length (paired by user)")
    d = a - b
    means = np.concatenate([d[idx].mean(axis=1) for idx in _chunks(len(d), n, seed)])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(lo), float(hi)


def paired_bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """``mean(a) / mean(b)`` and its paired percentile bootstrap CI: ``(ratio, lo, hi)`` (e.g. the
    ">= 1.08x HR@10 on long users" bar). Resamples with ``mean(b) == 0`` give inf/NaN and widen the CI."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError("a and b must be non-empty 1-D arrays of the same length (paired by user)")
    ratios = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for idx in _chunks(len(a), n, seed):
            ratios.append(a[idx].mean(axis=1) / b[idx].mean(axis=1))
        point = a.mean() / b.mean()
    r = np.nan_to_num(np.concatenate(ratios), nan=np.inf, posinf=np.inf)  # nan_to_num caps inf by default
    # interpolating between two infinite resamples gives inf - inf = NaN: that bound is infinite
    lo, hi = (np.inf if np.isnan(q) else q for q in np.quantile(r, [alpha / 2, 1 - alpha / 2]))
    return float(point), float(lo), float(hi)


def _chunks(n_users: int, n: int, seed: int, max_cells: int = 4_000_000) -> list[np.ndarray]:
    """Bootstrap index matrices ``(rows, n_users)`` totalling ``n`` rows, drawn from one seeded stream."""
    rng = np.random.default_rng(seed)
    step = max(1, max_cells // max(n_users, 1))
    return [rng.integers(0, n_users, size=(min(step, n - i), n_users)) for i in range(0, n, step)]
