"""``hytrec bench state-dtype``: how far a state stored in fp16 / bf16 drifts from the exact user vector.

For a trained HyTRec checkpoint and an interactions file, takes a few evaluation batches of the test split
(shortest, median, and the two longest histories), builds each state twice: with the parallel form, and
through the serving recurrence one event at a time with the state stored in each dtype after every event
(:func:`hytrec.training.evaluate.streamed_state`), and reports the relative error of the user vector and the
overlap of the top-10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hytrec.benchmarks.harness import BenchPage, echo_result


def bench_state_dtype(
    model: Annotated[Path, typer.Option("--model", help="HyTRec checkpoint directory.")],
    data: Annotated[
        Path, typer.Option("--data", help="Interactions file (its leave-one-out test histories are used).")
    ],
    threads: Annotated[int, typer.Option("--threads", help="torch threads.")] = 1,
) -> None:
    """Relative error of the user vector and top-10 overlap, streamed fp32/fp16/bf16 state vs parallel form."""
    import numpy as np
    import torch

    from hytrec.model.checkpoint import load_checkpoint
    from hytrec.model.config import STATE_DTYPES
    from hytrec.training.data import Interactions, eval_batches, leave_one_out
    from hytrec.training.evaluate import final_user_vectors

    page = BenchPage.start(threads=threads)
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(model)
    if ckpt.model_type == "sasrec":
        raise typer.BadParameter("needs a HyTRec checkpoint", param_hint="--model")
    test = leave_one_out(Interactions.from_file(data, vocab=ckpt.vocab)).test
    batches = list(eval_batches(test.history, 65536, max_batch_size=512))
    picked = {id(b): b for b in (batches[0], batches[len(batches) // 2], *batches[-2:])}.values()
    net = ckpt.model.eval()
    result: dict[str, dict] = {}
    with torch.inference_mode():
        for b in picked:
            t = b.to_torch()
            now = torch.from_numpy(test.request_ts[b.index])
            exact = final_user_vectors(net, t["items"], t["timestamps"], t["lengths"], now)
            top_exact = net.item_scores(exact).topk(10).indices.tolist()
            key = f"{len(b)} users, {int(t['lengths'].min())}-{int(t['lengths'].max())} events"
            for dtype in STATE_DTYPES:
                u = final_user_vectors(net, t["items"], t["timestamps"], t["lengths"], now, stream_dtype=dtype)
                rel = (u - exact).norm(dim=-1) / exact.norm(dim=-1)
                top = net.item_scores(u).topk(10).indices.tolist()
                shared = [len(set(a) & set(c)) for a, c in zip(top_exact, top, strict=True)]
                result.setdefault(key, {})[dtype] = {
                    "max_rel_error": float(rel.max()),
                    "median_rel_error": float(rel.median()),
                    "mean_top10_shared": float(np.mean(shared)),
                }
    echo_result({"model_version": ckpt.version, "data": str(data), "batches": result, "meta": page.finish().meta()})
