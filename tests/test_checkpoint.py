"""Checkpoint round trip: same outputs, stable version, and clear errors for broken directories."""

from __future__ import annotations

import json

import pytest
import torch

from hytrec.model.baselines import SASRec, SASRecConfig
from hytrec.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.helpers_model import make_model, random_history


def test_round_trip_same_outputs_and_version(tmp_path) -> None:
    model = make_model()
    ids = [f"item{i}" for i in range(model.cfg.n_items)]
    version = save_checkpoint(tmp_path, model, ids, list(range(model.cfg.n_items)), meta={"epochs": 3})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.version == version and ckpt.version.startswith("hytrec-")
    assert ckpt.item_ids == ids and ckpt.meta == {"epochs": 3} and ckpt.model_type == "hytrec"
    items, ts = random_history(50, model.cfg.n_items, seed=0)
    args = (items[None], ts[None], ts[None] + 10, torch.tensor([50]))
    with torch.inference_mode():
        assert torch.equal(model(*args), ckpt.model(*args))
    assert load_checkpoint(tmp_path).version == version
    with torch.no_grad():
        model.item_emb.weight[5, 0] += 1.0
    assert save_checkpoint(tmp_path / "b", model, ids, [0] * len(ids)) != version


def test_sasrec_round_trip(tmp_path) -> None:
    model = SASRec(SASRecConfig(n_items=20, max_len=16)).eval()
    save_checkpoint(tmp_path, model, [str(i) for i in range(20)], [1] * 20)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.model_type == "sasrec" and isinstance(ckpt.model, SASRec)


def test_broken_checkpoints_raise(tmp_path) -> None:
    model = make_model()
    ids = [str(i) for i in range(model.cfg.n_items)]
    save_checkpoint(tmp_path, model, ids, [0] * len(ids))
    (tmp_path / "items.json").write_text(json.dumps({"item_ids": ids[:-1], "popularity": [0] * (len(ids) - 1)}))
    with pytest.raises(CheckpointError, match="item ids"):
        load_checkpoint(tmp_path)
    (tmp_path / "items.json").unlink()
    with pytest.raises(CheckpointError, match="no items.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, model, ids, [0] * len(ids))
    spec = json.loads((tmp_path / "config.json").read_text())
    spec["config"]["d_model"] = 32
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path)
