"""The alternatives to incremental state, under the same requests in the same run, in-process.

Three ways to answer "top-10 for this user now", each given the same sequence of requests (users cycling over a
fixed set, each asked 60 s after their last event), on one thread, over the page's catalogue (the run's
checkpoint, so the same item table and scoring the servers use):

* ``sasrec``: recompute a SASRec (random init, 2 layers, d = 64) over the user's last 200 events per request;
* ``parallel``: recompute HyTRec's parallel (chunked) form over the user's whole history per request
  (:meth:`HyTRec.build_state`, then the service's read-out and scoring);
* ``incremental``: the service's path: decode the stored state blob (as the store holds it), short branch,
  score (:meth:`ServingModel.recommend`).

Measured at the use-case level, not over HTTP: the HTTP stack and Redis would add the same per-request cost to
all three, and a recompute over HTTP would need a serving mode that does not exist. The histories are held as
ready tensors in memory (no store read, no parsing) and the state blobs as bytes, which flatters the recomputes:
a real one reads 10^4 events per request from somewhere. Alternatives run in interleaved rounds so machine noise
hits them alike; requests are sequential (batch 1), so requests/s is 1 / mean latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hytrec.benchmarks.harness import run_isolated

ALTERNATIVES = ("sasrec", "parallel", "incremental")


@dataclass(frozen=True)
class RecomputeSettings:
    histories: tuple[int, ...] = (100, 1000, 10_000)
    users: int = 8
    sasrec_len: int = 200
    seconds: float = 4.0  # per alternative and history length, over all rounds
    rounds: int = 4
    max_requests: int = 4000  # per alternative and history length
    k: int = 10
    seed: int = 0


def _pcts(samples: list[float]) -> dict[str, Any]:
    import numpy as np

    a = np.asarray(samples) * 1000.0
    return {
        "requests": len(a),
        "busy_s": float(a.sum() / 1000.0),
        "requests_per_s": float(len(a) / (a.sum() / 1000.0)),
        **{f"{q}_ms": float(np.percentile(a, p)) for q, p in (("p50", 50), ("p99", 99))},
        "max_ms": float(a.max()),
    }


def measure(ckpt: str, s: RecomputeSettings) -> dict[str, Any]:
    """Every history length and alternative, in this (fresh) process, one torch thread."""
    import numpy as np
    import torch

    from hytrec.model.baselines import SASRec, SASRecConfig
    from hytrec.model.serving import ServingModel

    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    model = ServingModel.load(ckpt)
    sas_cfg = SASRecConfig(n_items=model.n_items, d_model=model.cfg.d_model, max_len=s.sasrec_len, dropout=0.0)
    sas = SASRec(sas_cfg).eval()
    rng = np.random.default_rng(s.seed)
    out: dict[str, Any] = {"n_items": model.n_items, "d_model": model.cfg.d_model, "state_dtype": model.state_dtype}
    out["by_history"] = {str(n): one_length(model, sas, n, rng, s) for n in s.histories}
    return out


def one_length(model: Any, sas: Any, length: int, rng: Any, s: RecomputeSettings) -> dict[str, Any]:
    """The three alternatives over ``users`` histories of ``length`` events (items drawn Zipf, s = 1)."""
    import numpy as np
    import torch

    from hytrec.model.vocab import FIRST_ITEM_ROW

    p = 1.0 / np.arange(1, model.n_items + 1)
    rows = torch.from_numpy(rng.choice(model.n_items, size=(s.users, length), p=p / p.sum()) + FIRST_ITEM_ROW)
    times = torch.from_numpy(1.7e9 + np.cumsum(rng.uniform(1, 600, size=(s.users, length)), axis=1))
    with torch.inference_mode():
        blobs = [model.encode(model.model.build_state(rows[u : u + 1], times[u : u + 1], torch.tensor([length])))
                 for u in range(s.users)]  # fmt: skip
    now = [float(times[u, -1]) + 60.0 for u in range(s.users)]
    tail = min(length, s.sasrec_len)
    sas_rows = [rows[u : u + 1, -tail:].contiguous() for u in range(s.users)]

    @torch.inference_mode()
    def sasrec(u: int) -> list[str]:
        v = sas(sas_rows[u], times[u : u + 1, -tail:], None, torch.tensor([tail]))[:, -1]
        top = sas.item_scores(v).topk(s.k, dim=1).indices[0].tolist()
        return [model.item_ids[i] for i in top]

    @torch.inference_mode()
    def parallel(u: int) -> list[str]:
        state = model.model.build_state(rows[u : u + 1], times[u : u + 1], torch.tensor([length]))
        return model.recommend(state, [now[u]], s.k, [False])[0].item_ids

    def incremental(u: int) -> list[str]:
        return model.recommend(model.decode(blobs[u]), [now[u]], s.k, [False])[0].item_ids

    fns: dict[str, Callable[[int], list[str]]] = {"sasrec": sasrec, "parallel": parallel}
    fns["incremental"] = incremental
    agree = [len(set(parallel(u)) & set(incremental(u))) / s.k for u in range(s.users)]
    samples: dict[str, list[float]] = {name: [] for name in ALTERNATIVES}
    for _ in range(s.rounds):
        for name, fn in fns.items():
            fn(0)  # warm
            stop, i = time.perf_counter() + s.seconds / s.rounds, 0
            while i == 0 or (time.perf_counter() < stop and len(samples[name]) < s.max_requests):
                t0 = time.perf_counter()
                fn(i % s.users)
                samples[name].append(time.perf_counter() - t0)
                i += 1
    res = {name: _pcts(v) for name, v in samples.items()}
    inc = res["incremental"]["requests_per_s"]
    ratios = {f"incremental_over_{n}": inc / res[n]["requests_per_s"] for n in ("sasrec", "parallel")}
    return {
        **res,
        **ratios,
        "top10_agreement_parallel_vs_incremental": float(np.mean(agree)),
        "state_bytes": len(blobs[0]),
    }


def run_recompute(ckpt: str, s: RecomputeSettings, timeout_s: float = 1200.0) -> dict[str, Any]:
    """:func:`measure` in a fresh process."""
    return run_isolated(measure, ckpt, s, timeout_s=timeout_s).unwrap()
