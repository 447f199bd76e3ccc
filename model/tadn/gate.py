"""Time features shared by every form: the gap between events and its log-scaled feature."""

from __future__ import annotations

import torch
from torch import Tensor


def time_deltas(times: Tensor, last: Tensor | None = None) -> Tensor:
    """Gap in seconds between each event and the latest event before it, clamped at 0.

    ``times`` is (..., L) (float64 seconds). The first event has gap 0, and an event older than one
    before it (out of order) also gets 0: the gap is taken against the running maximum, which is
    exactly what the serving step sees (it keeps the latest timestamp in the state). ``last`` (...,):
    the latest timestamp before these events, when they continue a history (the first gap is then
    taken against it).
    """
    if times.shape[-1] == 0:
        return times.clone()
    first = times[..., :1] if last is None else last[..., None]
    running_max = torch.cummax(torch.maximum(times, first), dim=-1).values
    prev = torch.cat([first, running_max[..., :-1]], dim=-1)
    return (times - prev).clamp_min(0.0)


def time_feature(delta_seconds: Tensor, tau: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """phi(Delta) = log1p(Delta / tau): 0 for no gap, ~7 for a day at tau = 60 s, slowly growing after."""
    return torch.log1p(delta_seconds.clamp_min(0.0) / tau).to(dtype)
