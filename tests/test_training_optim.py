"""The optimiser as the field sets it up: two AdamW groups by a name rule, schedule and clipping from TrainConfig."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hytrec.model.checkpoint import build_model
from hytrec.training.config import ModelType, TrainConfig
from hytrec.training.optim import build_optimizer, clip_gradients, lr_factor, param_groups

NO_DECAY_LEAVES = {"bias", "a_log", "lambda_raw", "mu", "mem_bias", "pos_bias"}


@pytest.mark.parametrize("model_type", list(ModelType))
def test_every_parameter_is_in_exactly_one_group_and_only_linear_matrices_decay(model_type: ModelType) -> None:
    cfg = TrainConfig(model_type=model_type, weight_decay=0.05)
    model, _ = build_model(str(model_type), cfg.model_config(50))
    groups = {g["weight_decay"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {0.05, 0.0}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none left out
    modules = dict(model.named_modules())
    for name in groups[0.05]["names"]:
        owner, leaf = name.rsplit(".", 1)
        assert isinstance(modules[owner], nn.Linear) and leaf == "weight", name
    for name in groups[0.0]["names"]:
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        module = modules[owner]
        assert not isinstance(module, nn.Linear) or leaf == "bias", name
        # every no-decay parameter is one of the named kinds
        named = leaf in NO_DECAY_LEAVES or isinstance(module, (nn.Embedding, nn.LayerNorm)) or "norm" in owner
        assert named, name
    names = set(groups[0.0]["names"])
    assert "item_emb.weight" in names
    if model_type is not ModelType.SASREC and model_type is not ModelType.RECENT_SOFTMAX:
        assert {"blocks.0.tadn.a_log", "blocks.0.tadn.lambda_raw", "blocks.0.tadn.mu"} <= names
        assert {"blocks.0.tadn.a_proj.bias", "blocks.0.norm1.weight", "blocks.0.tadn.o_norm.weight"} <= names
        assert "blocks.0.tadn.q_proj.weight" in groups[0.05]["names"]
    if model_type is ModelType.SASREC:
        assert {"pos_emb.weight", "norm.weight", "norm.bias"} <= names


def test_decay_all_is_one_group_like_the_published_runs() -> None:
    cfg = TrainConfig(decay="all")
    model, _ = build_model("hytrec", cfg.model_config(50))
    [group] = param_groups(model, cfg)
    assert group["weight_decay"] == cfg.weight_decay and len(group["params"]) == len(list(model.parameters()))


def test_the_optimizer_applies_no_decay_where_the_rule_says() -> None:
    """One step with zero gradients: only decayed parameters move (by lr * wd * value)."""
    cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    model, _ = build_model("hytrec", cfg.model_config(50))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _ = build_optimizer(model, cfg, total_steps=10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["blocks.0.tadn.a_log"], before["blocks.0.tadn.a_log"])
    assert torch.equal(after["item_emb.weight"], before["item_emb.weight"])
    assert torch.equal(after["blocks.0.ffn.up.bias"], before["blocks.0.ffn.up.bias"])
    w = "blocks.0.tadn.q_proj.weight"
    assert torch.allclose(after[w], before[w] * (1 - 0.1 * 0.5))


def test_schedules() -> None:
    const = TrainConfig(warmup_steps=4)
    assert [lr_factor(s, const, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = TrainConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(9, cos, 110) == 1.0 and lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cos, 110) == pytest.approx(0.1) and lr_factor(500, cos, 110) == pytest.approx(0.1)
    model, _ = build_model("hytrec", cos.model_config(50))
    opt, sched = build_optimizer(model, cos, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(cos.lr / 10) and max(lrs) == pytest.approx(cos.lr)
    assert lrs[-1] == pytest.approx(cos.lr * lr_factor(109, cos, 110))
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradient_clipping_is_the_config_field(clip: float) -> None:
    cfg = TrainConfig(grad_clip=clip)
    model, _ = build_model("tadn-only", cfg.model_config(50))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    clip_gradients(model, cfg)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert after == pytest.approx(float(norm) if clip == 0 else clip, rel=1e-5)


def test_bad_values_are_rejected() -> None:
    for field in ("grad_clip", "weight_decay", "warmup_steps", "checkpoint_every"):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: -1})
