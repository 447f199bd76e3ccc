"""Training: next-item prediction at every position, AdamW, early stopping on validation NDCG@10.

One loop for every model type (the HyTRec variants and the SASRec+ baseline). The output directory is a
checkpoint (:mod:`hytrec.model.checkpoint`: the best epoch's weights, config and items) plus ``log.jsonl``
(one line per epoch), ``metrics.json`` (validation and test of the best epoch) and the resumable
``train_state.safetensors`` / ``train_state.json`` (weights, optimiser moments, RNG states, counters).
The run's settings are :class:`hytrec.training.config.TrainConfig` (re-exported here).
"""

from __future__ import annotations

import json
import math
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

from hytrec.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from hytrec.model.vocab import FIRST_ITEM_ROW
from hytrec.training.config import Loss, TrainConfig
from hytrec.training.data import Interactions, Split, leave_one_out, train_batches
from hytrec.training.evaluate import evaluate, evaluate_both
from hytrec.training.losses import full_softmax_cross_entropy


def item_popularity(split: Split) -> np.ndarray:
    """Training interactions per item (aligned with ``vocab.ids``)."""
    counts = np.bincount(split.train.items, minlength=split.data.vocab.n_rows)
    return counts[FIRST_ITEM_ROW:]


def next_item_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, log_q: torch.Tensor | None):
    """Mean cross-entropy of predicting event t+1 from events <= t, at every real position."""
    items, times, lengths = batch["items"], batch["timestamps"], batch["lengths"]
    lengths = lengths - 1
    u = model(items[:, :-1], times[:, :-1], times[:, 1:], lengths)
    mask = torch.arange(items.shape[1] - 1)[None, :] < lengths[:, None]
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
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))


def _save_train_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for name, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, out / "train_state.safetensors")
    (out / "train_state.json").write_text(json.dumps(info))


def _load_train_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    tensors = load_file(out / "train_state.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        state = {k.split(".")[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = state
    torch.set_rng_state(tensors["torch_rng"])
    return json.loads((out / "train_state.json").read_text())


def train(data_path: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False, quiet: bool = False):
    """Train on the leave-one-out split of ``data_path``; returns the contents of ``metrics.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = Interactions.from_file(data_path)
    split = leave_one_out(data)
    popularity = item_popularity(split)
    model, _ = build_model(str(cfg.model_type), cfg.model_config(data.vocab.n_items))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log_q = torch.log(torch.from_numpy(popularity + 1.0).float() / float(popularity.sum() + len(popularity)))
    info = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": 0, "bad_epochs": 0, "rng": None}
    log_path = out / "log.jsonl"
    if resume and (out / "train_state.json").exists():
        info = _load_train_state(out, model, opt)
        rng.bit_generator.state = info["rng"]
    else:  # a fresh run: no lines of an earlier run in the log
        log_path.unlink(missing_ok=True)
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "data": str(data_path)}, indent=2))
    seq_len = cfg.max_len + 1 if cfg.max_len else None  # +1: the last event of a window is only a target

    while info["epoch"] < cfg.epochs and info["bad_epochs"] < cfg.patience:
        epoch = info["epoch"] + 1
        model.train()
        batches = list(train_batches(split.train, cfg.batch_tokens, seed=rng, max_len=seq_len))
        total_loss, tokens, started = 0.0, 0, time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=quiet, leave=False)
        for batch in bar:
            t = batch.to_torch()
            loss = next_item_loss(model, t, cfg, log_q)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n = int((t["lengths"] - 1).sum())
            total_loss, tokens = total_loss + loss.item() * n, tokens + n
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        train_seconds = time.perf_counter() - started
        val = evaluate(model, split.valid).summary
        ndcg = val["all"]["NDCG@10"]
        improved = ndcg > info["best_ndcg"]
        info.update(epoch=epoch, bad_epochs=0 if improved else info["bad_epochs"] + 1)
        if improved:
            info.update(best_ndcg=ndcg, best_epoch=epoch)
            save_checkpoint(out, model, data.vocab.ids, popularity.tolist(), meta={"epoch": epoch, **asdict(cfg)})
        record = {
            "epoch": epoch,
            "train_loss": total_loss / max(tokens, 1),
            "train_seconds": round(train_seconds, 2),
            "tokens_per_s": round(tokens / train_seconds),
            "eval_seconds": round(time.perf_counter() - started - train_seconds, 2),
            "val": val["all"],
            "best_epoch": info["best_epoch"],
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not quiet:
            tqdm.write(
                f"epoch {epoch}: loss {record['train_loss']:.4f} | {record['tokens_per_s']} tok/s | "
                f"val HR@10 {val['all']['HR@10']:.4f} NDCG@10 {ndcg:.4f}{' *' if improved else ''}"
            )
        info["rng"] = rng.bit_generator.state
        _save_train_state(out, model, opt, info)
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch}")

    best = load_checkpoint(out)
    test, test_all = evaluate_both(best.model, split.test)
    valid = evaluate(best.model, split.valid)
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
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    np.save(out / "test_ranks.npy", test.ranks)
    np.save(out / "test_ranks_unfiltered.npy", test_all.ranks)  # the repeat-aware protocol (nothing filtered)
    return result
