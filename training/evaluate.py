"""Full-ranking evaluation: the user vector at each history's end, scored against the whole catalogue.

HyTRec variants read their user vector through the serving path (``build_state`` + ``user_vector``: the
long branch in its parallel form, the short branch once at the request time), which the parity tests tie
to the training forward; SASRec reads the forward at the last of its ``max_len`` positions. Items the user
already interacted with are removed from the ranking (``exclude_seen``), the target never.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hytrec.model.baselines import SASRec
from hytrec.model.hytrec import HyTRec
from hytrec.model.state import StateBatch
from hytrec.training.data import EvalSet, eval_batches
from hytrec.training.metrics import per_user_metrics, summarize, target_ranks


def history_max_len(model: nn.Module) -> int | None:
    """How many of the latest events the model reads (None: all)."""
    return model.cfg.max_len if isinstance(model, SASRec) else None


@torch.inference_mode()
def streamed_state(model: HyTRec, items: torch.Tensor, times: torch.Tensor, lengths: torch.Tensor, dtype: str):
    """Serving states built the way the service builds them: one batched step per event, the state
    stored in ``dtype`` (rounded as the codec rounds it) after every event."""
    state = StateBatch.empty(model.cfg, len(lengths))
    for t in range(items.shape[1]):
        state = model.step(state, items[:, t], times[:, t], lengths > t).as_stored(dtype)
    return state


@torch.inference_mode()
def final_user_vectors(
    model: nn.Module,
    items: torch.Tensor,
    times: torch.Tensor,
    lengths: torch.Tensor,
    now: torch.Tensor,
    stream_dtype: str | None = None,
):
    """User vectors (B, d) after each right-padded history, at request times ``now`` (B,) float64.

    HyTRec states come from the parallel form, or with ``stream_dtype`` from the serving recurrence
    (:func:`streamed_state`)."""
    if isinstance(model, HyTRec):
        if stream_dtype is None:
            state = model.build_state(items, times, lengths)
        else:
            state = streamed_state(model, items, times, lengths, stream_dtype)
        return model.user_vector(state, now)
    if stream_dtype is not None:
        raise ValueError(f"{type(model).__name__} has no streaming form")
    query_times = torch.cat([times[:, 1:], now[:, None]], dim=1)
    u = model(items, times, query_times, lengths)
    return u[torch.arange(len(lengths)), lengths - 1]


@dataclass
class Evaluation:
    ranks: np.ndarray  # per prediction, in EvalSet order (rank 0 = top)
    per_user: dict[str, np.ndarray]  # HR@k / NDCG@k per prediction
    summary: dict[str, dict[str, float]]  # "all" and one entry per history-length bucket


@torch.inference_mode()
def target_ranks_of(
    model: nn.Module,
    eval_set: EvalSet,
    exclude_seen: tuple[bool, ...],
    stream_dtype: str | None = None,
    device: torch.device | str = "cpu",
    history_limit: int | None = None,
) -> list[np.ndarray]:
    """One pass of the model (on ``device``) over ``eval_set``; the target ranks of one full-catalogue
    ranking per entry of ``exclude_seen``, in EvalSet order. ``history_limit``: the model reads only each
    history's last that many events (a probe of what the older ones add); the seen items removed from the
    ranking stay the whole history's, and the buckets stay by whole-history length."""
    model.eval()
    ranks = [np.zeros(len(eval_set), dtype=np.int64) for _ in exclude_seen]
    max_len = history_max_len(model)
    if history_limit is not None:
        max_len = history_limit if max_len is None else min(max_len, history_limit)
    for batch in eval_batches(eval_set.history, 65536, max_len=max_len, max_batch_size=512):
        t = batch.to_torch(device)
        now = torch.from_numpy(eval_set.request_ts[batch.index]).to(device)
        u = final_user_vectors(model, t["items"], t["timestamps"], t["lengths"], now, stream_dtype)
        scores = model.logits(u.float())
        targets = eval_set.targets[batch.index]
        for r, exclude in zip(ranks, exclude_seen, strict=True):
            seen = [eval_set.history.sequence(int(i))[0] for i in batch.index] if exclude else None
            r[batch.index] = target_ranks(scores, targets, seen, ties="pessimistic")
    return ranks


def from_ranks(ranks: np.ndarray, eval_set: EvalSet) -> Evaluation:
    """The metrics of target ranks given in ``eval_set`` order."""
    per_user = per_user_metrics(ranks)
    return Evaluation(ranks, per_user, summarize(per_user, eval_set.buckets))


def subset(eval_set: EvalSet, index: np.ndarray) -> EvalSet:
    """The predictions ``index`` of ``eval_set`` (e.g. one process's share)."""
    index = np.asarray(index, dtype=np.int64)
    return EvalSet(
        history=eval_set.history.take_prefixes(eval_set.history.lengths[index], index),
        targets=eval_set.targets[index],
        request_ts=eval_set.request_ts[index],
        user_index=eval_set.user_index[index],
    )


def _rankings(
    model: nn.Module,
    eval_set: EvalSet,
    exclude_seen: tuple[bool, ...],
    stream_dtype: str | None,
    history_limit: int | None = None,
) -> list[Evaluation]:
    ranks = target_ranks_of(model, eval_set, exclude_seen, stream_dtype, history_limit=history_limit)
    return [from_ranks(r, eval_set) for r in ranks]


def evaluate_both(
    model: nn.Module, eval_set: EvalSet, stream_dtype: str | None = None, history_limit: int | None = None
) -> tuple[Evaluation, Evaluation]:
    """Rank every prediction of ``eval_set`` over the full catalogue with the user's seen items removed
    from the ranking, and with them kept; one pass of the model for both (``stream_dtype``: see
    :func:`final_user_vectors`; ``history_limit``: see :func:`target_ranks_of`)."""
    filtered, unfiltered = _rankings(model, eval_set, (True, False), stream_dtype, history_limit)
    return filtered, unfiltered


def evaluate(
    model: nn.Module, eval_set: EvalSet, exclude_seen: bool = True, stream_dtype: str | None = None
) -> Evaluation:
    """Rank every prediction of ``eval_set`` over the full catalogue (seen items removed by default)."""
    return _rankings(model, eval_set, (exclude_seen,), stream_dtype)[0]
