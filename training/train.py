"""Training: next-item prediction at every position, AdamW, early stopping on validation NDCG@10.

One loop for every model type (the HyTRec variants and the SASRec+ baseline), on CPU or CUDA, in one
process or data-parallel under ``torchrun`` (:mod:`hytrec.training.distributed`). The output directory is a
checkpoint (:mod:`hytrec.model.checkpoint`: the best epoch's weights, config and items) plus ``log.jsonl``
(one line per epoch), ``steps.jsonl`` (loss and learning rate of every optimiser step), ``metrics.json``
(validation and test of the best epoch) and ``train_state/`` (what ``--resume`` reads: weights, optimiser
moments, scheduler, every process's torch / numpy / python RNG states, the epoch's batch-order state and the
step within it; safetensors + JSON, written atomically). The run's settings are
:class:`hytrec.training.config.TrainConfig` (re-exported here).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from hytrec.model.checkpoint import build_model, load_checkpoint, save_checkpoint, write_dir_atomically
from hytrec.model.tadn import set_kernel
from hytrec.model.vocab import FIRST_ITEM_ROW
from hytrec.training import distributed
from hytrec.training.config import Loss, Precision, TrainConfig
from hytrec.training.data import EvalSet, Interactions, Split, epoch_plan, leave_one_out, make_batch
from hytrec.training.evaluate import Evaluation, from_ranks, subset, target_ranks_of
from hytrec.training.losses import full_softmax_cross_entropy
from hytrec.training.optim import build_optimizer, clip_gradients

STATE_DIR = "train_state"


def item_popularity(split: Split) -> np.ndarray:
    """Training interactions per item (aligned with ``vocab.ids``)."""
    counts = np.bincount(split.train.items, minlength=split.data.vocab.n_rows)
    return counts[FIRST_ITEM_ROW:]


def next_item_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    log_q: torch.Tensor | None,
    forward: nn.Module | None = None,
):
    """Mean cross-entropy of predicting event t+1 from events <= t, at every real position.

    ``forward``: the module to call (a DDP wrapper of ``model``; default ``model``). With ``cfg.precision``
    bf16 the forward runs under autocast; the loss is computed in fp32 outside it.
    """
    items, times, lengths = batch["items"], batch["timestamps"], batch["lengths"]
    lengths = lengths - 1
    amp = cfg.precision is Precision.BF16
    with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=amp):
        u = (forward or model)(items[:, :-1], times[:, :-1], times[:, 1:], lengths)
    u = u.float()
    mask = torch.arange(items.shape[1] - 1, device=items.device)[None, :] < lengths[:, None]
    u, targets = u[mask], items[:, 1:][mask]
    if cfg.loss == Loss.FULL:  # over catalogue columns only, in row blocks (the logit matrix is never stored)
        return full_softmax_cross_entropy(u, model.item_emb.weight[FIRST_ITEM_ROW:], targets - FIRST_ITEM_ROW)
    # Sampled softmax with logQ correction: shared negatives drawn from the popularity distribution.
    emb = model.item_emb.weight
    negatives = torch.multinomial(log_q.exp(), cfg.negatives, replacement=True) + FIRST_ITEM_ROW
    pos = (u * emb[targets]).sum(-1) - log_q[targets - FIRST_ITEM_ROW]
    neg = u @ emb[negatives].T - log_q[negatives - FIRST_ITEM_ROW]
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=logits.device))


def _rng_state(world: distributed.World) -> dict[str, Any]:
    """This process's torch (CPU and CUDA) and python RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if world.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(world.device)
    return state


def _set_rng_state(world: distributed.World, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], world.device)


def _save_train_state(
    out: Path,
    world: distributed.World,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    info: dict[str, Any],
    rng_epoch_start: dict[str, Any],
) -> None:
    """Collective (every rank calls it): rank 0 writes ``train_state/`` with every rank's RNG states."""
    rngs = world.all_gather(_rng_state(world))
    if not world.is_main:
        return
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for pid, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for rank, r in enumerate(rngs):
        tensors[f"rng.{rank}.torch"] = r["torch"]
        if "cuda" in r:
            tensors[f"rng.{rank}.cuda"] = r["cuda"].cpu()
    doc = {
        "info": info,
        "world_size": world.size,
        "rng_epoch_start": rng_epoch_start,  # numpy Generator state: recomputes the epoch's batch order
        "python_rng": [list(r["python"][:1]) + [list(r["python"][1]), r["python"][2]] for r in rngs],
        "optimizer_param_groups": opt_state["param_groups"],
        "scheduler": sched.state_dict(),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(doc))

    write_dir_atomically(out / STATE_DIR, write)


def _state_dir(out: Path) -> Path | None:
    """The last complete train state: ``train_state/``, or ``train_state.old/`` if a swap stopped half-way."""
    for name in (STATE_DIR, STATE_DIR + ".old"):
        if (out / name / "state.json").is_file():
            return out / name
    return None


def _load_train_state(
    directory: Path,
    world: distributed.World,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore everything; returns (info, numpy state at the start of the current epoch)."""
    doc = json.loads((directory / "state.json").read_text())
    if doc["world_size"] != world.size:
        raise ValueError(
            f"{directory} was written by {doc['world_size']} processes; resume it with as many (this run has "
            f"{world.size}): each process's RNG state is part of it"
        )
    tensors = load_file(directory / "state.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": doc["optimizer_param_groups"]})
    sched.load_state_dict(doc["scheduler"])
    rank = world.rank
    rng: dict[str, Any] = {"torch": tensors[f"rng.{rank}.torch"], "python": doc["python_rng"][rank]}
    if f"rng.{rank}.cuda" in tensors and world.device.type == "cuda":
        rng["cuda"] = tensors[f"rng.{rank}.cuda"]
    _set_rng_state(world, rng)
    return doc["info"], doc["rng_epoch_start"]


def _keep_lines(path: Path, keep) -> None:
    """Drop the lines of a JSONL log written after the state a run resumes from."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
        path.write_text("".join(line + "\n" for line in lines))


def _evaluate(
    model: nn.Module, eval_set: EvalSet, world: distributed.World, exclude_seen: tuple[bool, ...] = (True,)
) -> list[Evaluation]:
    """Each rank ranks its share ``[rank::world]`` of the predictions; the ranks are gathered on every rank."""
    if not world.distributed:
        ranks = target_ranks_of(model, eval_set, exclude_seen, device=world.device)
        return [from_ranks(r, eval_set) for r in ranks]
    mine = np.arange(len(eval_set))[world.rank :: world.size]
    ranks = target_ranks_of(model, subset(eval_set, mine), exclude_seen, device=world.device)
    full = [np.zeros(len(eval_set), dtype=np.int64) for _ in exclude_seen]
    for index, part in world.all_gather((mine, ranks)):
        for f, r in zip(full, part, strict=True):
            f[index] = r
    return [from_ranks(r, eval_set) for r in full]


def _unused_parameters(model: nn.Module, split: Split, cfg: TrainConfig, log_q: torch.Tensor, device) -> bool:
    """Whether a training step leaves some parameter without a gradient (DDP must then be told)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        lengths = split.train.lengths
        index = np.flatnonzero(lengths >= 2)[:2]
        loss = next_item_loss(model, make_batch(split.train, index, 8).to_torch(device), cfg, log_q)
        loss.backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return unused


def train(data_path: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False, quiet: bool = False):
    """Train on the leave-one-out split of ``data_path``; returns the contents of ``metrics.json``.

    Under ``torchrun`` every process calls this with the same arguments (see :mod:`hytrec.training.distributed`).
    ``resume``: continue from ``out/train_state`` (if there is one) exactly where it was written.
    """
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = distributed.init(str(cfg.device))
    try:
        return _train(Path(data_path), Path(out), cfg, world, resume, quiet)
    finally:
        if not was_initialised:
            distributed.shutdown(world)


def _train(data_path: Path, out: Path, cfg: TrainConfig, world: distributed.World, resume: bool, quiet: bool):
    device = world.device
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_kernel(str(cfg.kernel))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the batch order: the same generator on every rank
    data = Interactions.from_file(data_path, tie_seed=cfg.tie_seed)
    split = leave_one_out(data)
    popularity = item_popularity(split)
    model, _ = build_model(str(cfg.model_type), cfg.model_config(data.vocab.n_items))
    model.to(device)
    if world.rank:  # rank 0 keeps the single-process stream; the others draw their own dropout masks
        torch.manual_seed(cfg.seed + 1_000_003 * world.rank)
        random.seed(cfg.seed + 1_000_003 * world.rank)
    seq_len = cfg.max_len + 1 if cfg.max_len else None  # +1: the last event of a window is only a target
    steps_per_epoch = len(epoch_plan(split.train, cfg.batch_tokens, seed=0, max_len=seq_len))  # seed-independent
    opt, sched = build_optimizer(model, cfg, cfg.epochs * steps_per_epoch)
    log_q = torch.log(torch.from_numpy(popularity + 1.0).float() / float(popularity.sum() + len(popularity)))
    log_q = log_q.to(device)
    info: dict[str, Any] = {
        "epoch": 0,  # epochs finished
        "step": 0,  # optimiser steps done in the current epoch
        "global_step": 0,
        "best_ndcg": -1.0,
        "best_epoch": 0,
        "bad_epochs": 0,
        "epoch_loss": 0.0,  # the current epoch's sum of target losses so far
        "epoch_tokens": 0,
        "epoch_sequences": 0,
        "epoch_seconds": 0.0,
    }
    log_path, steps_path = out / "log.jsonl", out / "steps.jsonl"
    state_dir = _state_dir(out) if resume else None
    if resume and state_dir is None and (out / "train_state.json").exists():
        raise ValueError(f"{out}: its train state was written by an older trainer (train_state.json); cannot resume")
    if state_dir is not None:
        saved, rng_state = _load_train_state(state_dir, world, model, opt, sched)
        info = {**info, **saved}
        rng.bit_generator.state = rng_state
        if world.is_main:
            _keep_lines(log_path, lambda r: r["epoch"] <= info["epoch"])
            _keep_lines(steps_path, lambda r: r["step"] <= info["global_step"])
    elif world.is_main:  # a fresh run: no lines of an earlier run in the logs
        log_path.unlink(missing_ok=True)
        steps_path.unlink(missing_ok=True)
    if world.is_main:
        (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "data": str(data_path)}, indent=2))
    forward: nn.Module = model
    if world.distributed:
        unused = _unused_parameters(model, split, cfg, log_q, device)
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )
    lengths = split.train.lengths if seq_len is None else np.minimum(split.train.lengths, seq_len)

    while info["epoch"] < cfg.epochs and info["bad_epochs"] < cfg.patience:
        epoch = info["epoch"] + 1
        rng_epoch_start = rng.bit_generator.state
        plan = epoch_plan(split.train, cfg.batch_tokens, seed=rng, max_len=seq_len)
        model.train()
        started = time.perf_counter() - info["epoch_seconds"]
        bar = tqdm(total=len(plan), initial=info["step"], desc=f"epoch {epoch}", disable=quiet or not world.is_main)
        step_lines: list[str] = []
        for step in range(info["step"], len(plan)):
            index = plan[step]
            n_global = int((lengths[index] - 1).sum())
            mine, weight = index[world.rank :: world.size], 1.0
            if not len(mine):  # fewer users than ranks: a zero-weight step keeps DDP's collectives in step
                mine, weight = index[:1], 0.0
            t = make_batch(split.train, mine, seq_len).to_torch(device)
            n_local = int((t["lengths"] - 1).sum())
            mean = next_item_loss(model, t, cfg, log_q, forward)
            # DDP averages gradients over ranks: this scale makes the average that of the global batch's mean
            # loss (exactly 1.0 in one process, so a single-process run computes what it always did).
            loss = mean * (weight * n_local * world.size / n_global)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, cfg)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            [batch_loss] = world.sum([mean.item() * n_local * weight])
            info.update(step=step + 1, global_step=info["global_step"] + 1)
            info["epoch_loss"] += batch_loss
            info["epoch_tokens"] += n_global
            info["epoch_sequences"] += len(index)
            step_lines.append(json.dumps({"step": info["global_step"], "loss": batch_loss / n_global, "lr": lr}))
            elapsed = time.perf_counter() - started
            bar.update()
            bar.set_postfix(loss=f"{batch_loss / n_global:.3f}", tok_s=f"{info['epoch_tokens'] / elapsed:.0f}")
            if cfg.checkpoint_every and info["global_step"] % cfg.checkpoint_every == 0 and step + 1 < len(plan):
                if world.is_main:
                    _append(steps_path, step_lines)
                step_lines = []
                info["epoch_seconds"] = time.perf_counter() - started
                _save_train_state(out, world, model, opt, sched, info, rng_epoch_start)
        bar.close()
        train_seconds = time.perf_counter() - started
        [val] = _evaluate(model, split.valid, world)
        ndcg = val.summary["all"]["NDCG@10"]
        improved = ndcg > info["best_ndcg"]
        total_loss, tokens, sequences = info["epoch_loss"], info["epoch_tokens"], info["epoch_sequences"]
        info.update(epoch=epoch, step=0, epoch_loss=0.0, epoch_tokens=0, epoch_sequences=0, epoch_seconds=0.0)
        info["bad_epochs"] = 0 if improved else info["bad_epochs"] + 1
        if improved:
            info.update(best_ndcg=ndcg, best_epoch=epoch)
            if world.is_main:
                meta = {"epoch": epoch, **asdict(cfg)}
                save_checkpoint(out, model, data.vocab.ids, popularity.tolist(), meta=meta)
        record = {
            "epoch": epoch,
            "train_loss": total_loss / max(tokens, 1),
            "train_seconds": round(train_seconds, 2),
            "tokens_per_s": round(tokens / train_seconds),
            "targets": tokens,  # next-item predictions trained on (all processes)
            "sequences": sequences,
            "peak_memory_bytes": max(world.all_gather(_peak_memory(device))),  # of the largest process
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
            "eval_seconds": round(time.perf_counter() - started - train_seconds, 2),
            "val": val.summary["all"],
            "best_epoch": info["best_epoch"],
            "processes": world.size,
        }
        if world.is_main:
            _append(steps_path, step_lines)
            _append(log_path, [json.dumps(record)])
            if not quiet:
                tqdm.write(
                    f"epoch {epoch}: loss {record['train_loss']:.4f} | {record['tokens_per_s']} tok/s | "
                    f"val HR@10 {val.summary['all']['HR@10']:.4f} NDCG@10 {ndcg:.4f}{' *' if improved else ''}"
                )
        _save_train_state(out, world, model, opt, sched, info, rng.bit_generator.state)
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch}")

    world.barrier()  # rank 0 has written the best checkpoint
    best = load_checkpoint(out)
    best.model.to(device)
    test, test_all = _evaluate(best.model, split.test, world, (True, False))
    [valid] = _evaluate(best.model, split.valid, world)
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    result = {
        "model_type": str(cfg.model_type),
        "model_version": best.version,
        "data": str(data_path),
        "seed": cfg.seed,
        "best_epoch": info["best_epoch"],
        "epochs_run": info["epoch"],
        "mean_epoch_train_seconds": float(np.mean([r["train_seconds"] for r in log])),
        "valid": valid.summary,
        "test": test.summary,
        "test_unfiltered": test_all.summary,
    }
    if world.is_main:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        np.save(out / "test_ranks.npy", test.ranks)
        np.save(out / "test_ranks_unfiltered.npy", test_all.ranks)  # the repeat-aware protocol (nothing filtered)
    world.barrier()
    return result


def _peak_memory(device: torch.device) -> int:
    """This process's peak: CUDA memory allocated by torch on a GPU, resident set size on CPU (bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _append(path: Path, lines: list[str]) -> None:
    if lines:
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
