"""The optimiser as nanoGPT and flash-linear-attention set it up: AdamW over two parameter groups, a warm-up
then constant or cosine learning rate, and the clipping norm, all read from :class:`TrainConfig`.

Weight decay pulls a parameter towards zero; that is a prior for the matrices that mix features, and the
wrong one for everything else (rule :attr:`DecayRule.MATRICES`, by module class and parameter name):

* decayed: ``weight`` of every ``nn.Linear`` (q/k/v/o, gate and FFN projections, the fusion layer);
* not decayed: every other parameter, which in these models is
  - biases (``*.bias``, including the TADN gate biases ``a_proj.bias`` = b_h and ``b_proj.bias``),
  - norm scales (``RMSNorm`` / ``LayerNorm`` ``weight`` and ``bias``),
  - embedding tables (``nn.Embedding``: ``item_emb``, SASRec's ``pos_emb``, the short branch's ``age_bias``):
    the item table is also the output layer, where decay shrinks every logit towards a uniform softmax, and
    ``pos_emb`` / ``age_bias`` are per-position biases,
  - the free per-head gate and time parameters ``a_log`` (A_h), ``lambda_raw``, ``mu``, ``mem_bias`` and
    ``pos_bias`` (decaying ``a_log`` to 0 would move every head's forgetting rate to exp(0) = 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hytrec.training.config import DecayRule, Schedule, TrainConfig


def decays(module: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``module`` (its own, not a submodule's) gets weight decay."""
    return isinstance(module, nn.Linear) and name == "weight"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: ``decay`` (weight_decay = cfg.weight_decay) and ``no_decay`` (0), each with its names."""
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "names": [], "weight_decay": cfg.weight_decay},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:  # a shared parameter goes in once
                continue
            seen.add(id(p))
            key = "decay" if cfg.decay is DecayRule.ALL or decays(module, name) else "no_decay"
            groups[key]["params"].append(p)
            groups[key]["names"].append(f"{module_name}.{name}" if module_name else name)
    return [g for g in groups.values() if g["params"]]


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate / cfg.lr at optimiser step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule is Schedule.CONSTANT:
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its :func:`lr_factor` schedule (stepped once per optimiser step)."""
    fused = next(model.parameters()).is_cuda or None  # the fused CUDA kernel where it exists; torch's default on CPU
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg, total_steps))
    return opt, sched


def clip_gradients(model: nn.Module, cfg: TrainConfig) -> None:
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
