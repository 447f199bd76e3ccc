"""Catalogue size: the service's exact top-10 against ANN indexes (faiss), on user vectors from a real model.

For each catalogue size a fresh process builds a random-init HyTRec over that many items (d = 64, no dropout),
streams Zipf-drawn histories through it (the parallel form, as a backfill does) and reads each user's vector at
a request time with :meth:`HyTRec.user_vector`: the queries are what the service would score, not random
points, which matters because an index's recall depends on the query distribution. The exact search is the
service's: ``user_vectors @ item_table.T`` then ``topk`` (:meth:`ServingModel.recommend` without its id mapping
and seen-item mask), fp32 and bf16. The indexes hold the same item table: HNSW (flat vectors, inner product)
at a few ``efSearch`` and IVF-Flat (inner product) at a few ``nprobe``. Everything runs on one thread (torch and
faiss's OpenMP), the build too. Recall@10 is against the fp32 exact top-10 of the same queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hytrec.benchmarks.harness import run_isolated

K = 10


@dataclass(frozen=True)
class CatalogueSettings:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    d_model: int = 64
    queries: int = 256  # user vectors; the batch-64 timings use them in 4 batches
    history: int = 200  # events per query user
    batch: int = 64
    repeats: int = 2  # passes over the queries for the timings (percentiles over all of them)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: tuple[int, ...] = (16, 64, 128, 256)
    ivf_lists_per_sqrt_n: float = 2.0  # nlist = this x sqrt(N)
    ivf_nprobe: tuple[int, ...] = (8, 32, 128)
    seed: int = 0


def user_vectors(n_items: int, s: CatalogueSettings) -> tuple[Any, Any, dict[str, Any]]:
    """The item table (N, d) and ``queries`` user vectors (Q, d), fp32, from a random-init HyTRec: histories of
    ``history`` events, items drawn Zipf (s = 1) over the catalogue, gaps of 1-600 s, read 60 s after the last."""
    import numpy as np
    import torch

    from hytrec.model.config import HyTRecConfig
    from hytrec.model.hytrec import HyTRec
    from hytrec.model.vocab import FIRST_ITEM_ROW

    torch.manual_seed(s.seed)
    model = HyTRec(HyTRecConfig(n_items=n_items, d_model=s.d_model, dropout=0.0)).eval()
    rng = np.random.default_rng(s.seed)
    p = 1.0 / np.arange(1, n_items + 1)
    rows = rng.choice(n_items, size=(s.queries, s.history), p=p / p.sum()) + FIRST_ITEM_ROW
    times = 1.7e9 + np.cumsum(rng.uniform(1, 600, size=(s.queries, s.history)), axis=1)
    with torch.inference_mode():
        items, ts = torch.from_numpy(rows).long(), torch.from_numpy(times).double()
        state = model.build_state(items, ts, torch.full((s.queries,), s.history))
        u = model.user_vector(state, ts[:, -1] + 60.0).float().contiguous()
        table = model.item_emb.weight[FIRST_ITEM_ROW:].detach().float().contiguous()
    un = torch.nn.functional.normalize(u, dim=1)
    cos = (un @ un.T)[~torch.eye(s.queries, dtype=torch.bool)]
    spread = {"mean_pairwise_cosine": round(float(cos.mean()), 4), "mean_norm": round(float(u.norm(dim=1).mean()), 4)}
    return table, u, spread


def _pcts(samples_s: list[float], per: int = 1) -> dict[str, float]:
    import numpy as np

    a = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "p50_per_query_ms": float(np.percentile(a, 50)) / per,
        "n": len(a),
    }


def _timed(search: Any, q: Any, batch: int, repeats: int) -> tuple[dict[str, float], Any]:
    """Latency of ``search(q[i:i+batch])`` over every batch of the queries, ``repeats`` passes (after one
    untimed warm-up call); the top-10 rows of the last pass."""
    search(q[:batch])
    samples, tops = [], []
    for r in range(repeats):
        for i in range(0, len(q) - batch + 1, batch):
            t0 = time.perf_counter()
            top = search(q[i : i + batch])
            samples.append(time.perf_counter() - t0)
            if r == repeats - 1:
                tops.append(top)
    return _pcts(samples, batch), tops


def recall(found: Any, exact: Any) -> float:
    """Mean |found & exact| / K over the queries (rows of item indices)."""
    hits = [len({int(i) for i in f} & {int(i) for i in e}) for f, e in zip(found, exact, strict=True)]
    return sum(hits) / (K * len(hits))


def measure_size(n_items: int, s: CatalogueSettings) -> dict[str, Any]:
    """One catalogue size, in its own process: exact fp32/bf16 and every index, batch 1 and ``batch``."""
    import faiss
    import numpy as np
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    table, u, spread = user_vectors(n_items, s)
    exact = torch.topk(u @ table.T, K, dim=1).indices.numpy()
    rows: list[dict[str, Any]] = []

    def add(method: str, params: str, search: Any, q: Any, build_s: float | None, bytes_: int) -> None:
        row: dict[str, Any] = {"method": method, "params": params, "build_s": build_s, "memory_mb": bytes_ / 2**20}
        for b in (1, s.batch):
            lat, tops = _timed(search, q, b, s.repeats)
            row[f"batch{b}"] = lat
        row["recall_at_10"] = recall(np.concatenate(tops), exact)
        rows.append(row)

    with torch.inference_mode():
        for name, dtype in (("exact fp32", torch.float32), ("exact bf16", torch.bfloat16)):
            w, q = table.to(dtype).contiguous(), u.to(dtype)
            add(name, "torch matmul + topk", lambda x, w=w: torch.topk(x @ w.T, K, dim=1).indices.numpy(), q, None,
                w.numel() * w.element_size())  # fmt: skip

    xb, xq = table.numpy(), u.numpy()
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(s.d_model, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = s.hnsw_ef_construction
    hnsw.add(xb)
    build, size = time.perf_counter() - t0, len(faiss.serialize_index(hnsw))
    for ef in s.hnsw_ef_search:
        hnsw.hnsw.efSearch = ef
        add("faiss HNSW", f"M={s.hnsw_m}, efC={s.hnsw_ef_construction}, efSearch={ef}",
            lambda x: hnsw.search(x, K)[1], xq, build, size)  # fmt: skip

    nlist = max(1, round(s.ivf_lists_per_sqrt_n * n_items**0.5))
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(s.d_model), s.d_model, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb[np.random.default_rng(s.seed).permutation(n_items)[: min(n_items, 40 * nlist)]])
    ivf.add(xb)
    build, size = time.perf_counter() - t0, len(faiss.serialize_index(ivf))
    for nprobe in s.ivf_nprobe:
        if nprobe > nlist:
            continue
        ivf.nprobe = nprobe
        add("faiss IVF-Flat", f"nlist={nlist}, nprobe={nprobe}", lambda x: ivf.search(x, K)[1], xq, build, size)
    return {"n_items": n_items, "queries": spread, "rows": rows}


def run_catalogue(s: CatalogueSettings, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Every size, each in a fresh process (its memory and threads its own); a size that fails is recorded."""
    import faiss

    by_size = {}
    for n in s.sizes:
        out = run_isolated(measure_size, n, s, timeout_s=timeout_s)
        by_size[str(n)] = out.value if out.ok else {"n_items": n, "error": f"{out.status}: {out.error}"}
    return {"faiss": faiss.__version__, "by_size": by_size}


def verdict(res: dict[str, Any], min_recall: float = 0.95) -> dict[str, Any]:
    """Per size, the fastest batch-1 configuration with recall@10 >= ``min_recall`` against the exact fp32 and
    bf16 batch-1 medians: what the page's conclusion line says."""
    out = {}
    for n, v in res["by_size"].items():
        if "rows" not in v:
            continue
        exact = {r["method"]: r["batch1"]["p50_ms"] for r in v["rows"] if r["method"].startswith("exact")}
        good = [r for r in v["rows"] if not r["method"].startswith("exact") and r["recall_at_10"] >= min_recall]
        best = min(good, key=lambda r: r["batch1"]["p50_ms"], default=None)
        best_exact = min(exact.values())
        out[n] = {
            "exact_p50_ms": best_exact,
            "ann": None if best is None else f"{best['method']} ({best['params']})",
            "ann_p50_ms": None if best is None else best["batch1"]["p50_ms"],
            "ann_recall": None if best is None else best["recall_at_10"],
            "speedup": None if best is None else best_exact / best["batch1"]["p50_ms"],
        }
    return out
