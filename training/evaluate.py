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

from model.baselines import SASRec
from model.hytrec import HyTRec
from training.data import EvalSet, eval_batches
from training.metrics import per_user_metrics, summarize, target_ranks


def history_max_len(model: nn.Module) -> int | None:
    """How many of the latest events the model reads (None: all)."""
    return model.cfg.max_len if isinstance(model, SASRec) else None


@torch.inference_mode()
def final_user_vectors(
    model: nn.Module, items: torch.Tensor, times: torch.Tensor, lengths: torch.Tensor, now: torch.Tensor
):
    """User vectors (B, d) after each right-padded history, at request times ``now`` (B,) float64."""
    if isinstance(model, HyTRec):
        return model.user_vector(model.build_state(items, times, lengths), now)
    query_times = torch.cat([times[:, 1:], now[:, None]], dim=1)
    u = model(items, times, query_times, lengths)
    return u[torch.arange(len(lengths)), lengths - 1]


@dataclass
class Evaluation:
    ranks: np.ndarray  # per prediction, in EvalSet order (rank 0 = top)
    per_user: dict[str, np.ndarray]  # HR@k / NDCG@k per prediction
    summary: dict[str, dict[str, float]]  # "all" and one entry per history-length bucket


@torch.inference_mode()
def evaluate(model: nn.Module, eval_set: EvalSet, exclude_seen: bool = True, max_tokens: int = 65536) -> Evaluation:
    """Rank every prediction of ``eval_set`` over the full catalogue."""
    model.eval()
    ranks = np.zeros(len(eval_set), dtype=np.int64)
    max_len = history_max_len(model)
    for batch in eval_batches(eval_set.history, max_tokens, max_len=max_len, max_batch_size=512):
        t = batch.to_torch()
        now = torch.from_numpy(eval_set.request_ts[batch.index])
        u = final_user_vectors(model, t["items"], t["timestamps"], t["lengths"], now)
        scores = model.logits(u)
        exclude = None
        if exclude_seen:
            exclude = [eval_set.history.sequence(int(i))[0] for i in batch.index]
        ranks[batch.index] = target_ranks(scores, eval_set.targets[batch.index], exclude, ties="pessimistic")
    per_user = per_user_metrics(ranks)
    return Evaluation(ranks, per_user, summarize(per_user, eval_set.buckets))
