"""Filters and candidate ranking: what a mask before the top-k and an O(candidates) rank cost in process.

One process builds a random-init HyTRec over ``n_items`` items (d = 64, one torch thread), streams Zipf
histories into states (the parallel form, as a backfill does) and times the model calls the service makes
per micro-batch, every case once per round, rounds repeated (order rotated) for ``min_run_time`` seconds per
case; figures are medians, ratios the median of the per-round ratios (each pair ran back to back):

- ``before``: the top-k as it was before filters existed (catalogue product, seen-item mask, top-k, id map);
- ``unfiltered``: ``ServingModel.recommend`` today with ``exclude_seen`` only (must not be slower);
- ``filtered``: the same call with each request's mask built by ``Catalogue.mask`` inside the timing
  (exclude ``exclude`` ids, ``categories`` of the 20, ``hidden`` items hidden, an offset of 10);
- ``filtered_ids``: the same without categories (exclude, hidden, offset: the whole catalogue still ranked);
- ``hidden_only``: a request with no filter of its own while items are hidden (the service's plain request
  whenever anything is hidden: every row carries the catalogue's one shared hidden-only mask);
- ``rank@N``: ``ServingModel.rank`` for N candidates per user (gathered embedding rows) against the full
  catalogue product of ``unfiltered``.

Ratios are within one run (on a shared machine absolute figures move, back-to-back ratios much less).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer


def _before(sm: Any, states: Any, now: list[float], k: int, exclude_seen: list[bool]) -> list[Any]:
    """The top-k path of ServingModel.recommend before filters (kept here only as the benchmark's baseline)."""
    import torch

    from hytrec.model.serving import Recommendation
    from hytrec.model.vocab import FIRST_ITEM_ROW

    with torch.inference_mode():
        u = sm.model.user_vector(states, torch.tensor(now, dtype=torch.float64))
        scores = sm.model.item_scores(u)
        drop = torch.tensor(exclude_seen)[:, None] & (states.ring_items >= FIRST_ITEM_ROW)
        if bool(drop.any()):
            users, slots = drop.nonzero(as_tuple=True)
            scores[users, states.ring_items[users, slots] - FIRST_ITEM_ROW] = float("-inf")
        top = scores.topk(min(k, sm.n_items), dim=1)
        out = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            keep = [(sm.item_ids[i], v) for i, v in zip(indices, values, strict=True) if v != float("-inf")]
            out.append(Recommendation([i for i, _ in keep], [v for _, v in keep]))
        return out


def measure(
    n_items: int = 100_000,
    batches: tuple[int, ...] = (1, 8, 64),
    k: int = 10,
    exclude: int = 50,
    categories: int = 2,
    hidden: int = 100,
    candidates: tuple[int, ...] = (100, 1000),
    history: int = 200,
    min_run_time: float = 1.0,
    min_rounds: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from hytrec.model.checkpoint import Checkpoint
    from hytrec.model.config import HyTRecConfig
    from hytrec.model.hytrec import HyTRec
    from hytrec.model.serving import ServingModel
    from hytrec.model.vocab import Vocab
    from hytrec.service.catalogue import Catalogue

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = HyTRecConfig(n_items=n_items, d_model=64, dropout=0.0)
    ids = [str(i) for i in range(n_items)]
    vocab = Vocab(ids, np.zeros(n_items, dtype=np.int64))
    sm = ServingModel(Checkpoint(HyTRec(cfg).eval(), "hytrec", cfg, vocab, "bench", {}))
    cat = Catalogue(vocab, {i: ("", [f"c{int(i) % 20}"]) for i in ids})
    rng = np.random.default_rng(seed)
    cat.apply_hidden(1, {str(x) for x in rng.choice(n_items, hidden, replace=False)})
    out: dict[str, Any] = {"n_items": n_items, "k": k, "torch_threads": 1, "results": {}}
    out["load_average_before"] = list(os.getloadavg())
    for b in batches:
        case = _Case(sm, cat, rng, b, k, history, exclude, categories, candidates)
        names = list(case.calls)
        for fn in case.calls.values():  # warm up
            fn()
        times: dict[str, list[float]] = {n: [] for n in names}
        deadline = time.perf_counter() + min_run_time * len(names)
        rounds = 0
        while rounds < min_rounds or time.perf_counter() < deadline:
            # every case once per round, the order rotated: drift on a shared machine hits every case alike
            for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
                start = time.perf_counter()
                case.calls[name]()
                times[name].append(time.perf_counter() - start)
            rounds += 1
        res = {n: statistics.median(t) * 1e3 for n, t in times.items()}

        def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
            """Median of the per-round ratios (each pair ran back to back)."""
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        ratios = {
            "unfiltered/before": ratio("unfiltered", "before"),
            "filtered/unfiltered": ratio("filtered", "unfiltered"),
            "filtered_ids/unfiltered": ratio("filtered_ids", "unfiltered"),
            "hidden_only/unfiltered": ratio("hidden_only", "unfiltered"),
            **{f"rank@{n}/unfiltered": ratio(f"rank@{n}", "unfiltered") for n in candidates},
        }
        out["results"][f"batch{b}"] = {"ms": res, "ratios": ratios, "rounds": rounds}
    out["load_average_after"] = list(os.getloadavg())
    return out


class _Case:
    """One batch size's states, filters and candidates, and the calls timed on them."""

    def __init__(
        self,
        sm: Any,
        cat: Any,
        rng: Any,
        b: int,
        k: int,
        history: int,
        exclude: int,
        categories: int,
        candidates: tuple[int, ...],
    ) -> None:
        import numpy as np
        import torch

        from hytrec.model.vocab import FIRST_ITEM_ROW
        from hytrec.service.catalogue import Filters

        n = sm.n_items
        p = 1.0 / np.arange(1, n + 1)
        rows = rng.choice(n, size=(b, history), p=p / p.sum()) + FIRST_ITEM_ROW
        times = 1.7e9 + np.cumsum(rng.uniform(1, 600, size=(b, history)), axis=1)
        with torch.inference_mode():
            self.states = sm.model.build_state(
                torch.from_numpy(rows).long(), torch.from_numpy(times).double(), torch.full((b,), history)
            )
        self.sm, self.cat, self.b, self.k = sm, cat, b, k
        self.now = (times[:, -1] + 60.0).tolist()
        self.seen = [True] * b
        self.filters = Filters(
            tuple(str(x) for x in rng.choice(n, exclude, replace=False)),
            tuple(f"c{c}" for c in range(categories)),
            True,
            10,
        )
        self.ids_only = Filters(self.filters.exclude, (), True, self.filters.offset)
        self.plain = Filters()
        cands = {m: [torch.from_numpy(rng.choice(n, m, replace=False)) for _ in range(b)] for m in candidates}
        self.calls = {
            "before": self.before,
            "unfiltered": self.unfiltered,
            "filtered": self.filtered,
            "filtered_ids": self.filtered_ids,
            "hidden_only": self.hidden_only,
            **{f"rank@{m}": (lambda c=c: sm.rank(self.states, self.now, c)) for m, c in cands.items()},
        }

    def before(self) -> Any:
        return _before(self.sm, self.states, self.now, self.k, self.seen)

    def unfiltered(self) -> Any:
        return self.sm.recommend(self.states, self.now, self.k, self.seen)

    def filtered_ids(self) -> Any:
        """Exclude, hidden and offset only (no categories): every row still takes the catalogue-wide top-k."""
        f = self.ids_only
        masks = [self.cat.mask(f) for _ in range(self.b)]
        return self.sm.recommend(self.states, self.now, self.k, self.seen, masks, [f.offset] * self.b)

    def hidden_only(self) -> Any:
        """No filter of the request's own, items hidden: the shared hidden-only mask on every row."""
        masks = [self.cat.mask(self.plain) for _ in range(self.b)]
        return self.sm.recommend(self.states, self.now, self.k, self.seen, masks, [0] * self.b)

    def filtered(self) -> Any:
        f = self.filters
        masks = [self.cat.mask(f) for _ in range(self.b)]
        return self.sm.recommend(self.states, self.now, self.k, self.seen, masks, [f.offset] * self.b)


def bench_filters(
    n_items: Annotated[int, typer.Option("--items", help="Catalogue size.")] = 100_000,
    min_run_time: Annotated[float, typer.Option("--min-run-time", help="Seconds per case (all rounds).")] = 1.0,
    batches: Annotated[str, typer.Option("--batches", help="Batch sizes, comma-separated.")] = "1,8,64",
    min_rounds: Annotated[int, typer.Option("--min-rounds", help="Rounds per batch size at least.")] = 50,
    out: Annotated[Path | None, typer.Option("--out", help="Write the figures as JSON here.")] = None,
) -> None:
    """Filtered vs unfiltered top-k and candidate ranking vs full ranking, in process (docs/service.md)."""
    sizes = tuple(int(x) for x in batches.split(",") if x.strip())
    result = measure(n_items=n_items, batches=sizes, min_run_time=min_run_time, min_rounds=min_rounds)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    typer.echo(text)
