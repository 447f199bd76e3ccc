"""Checkpoint round trip: same outputs, stable version, and clear errors for broken directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hytrec.model.baselines import SASRec, SASRecConfig
from hytrec.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hytrec.model.serving import ServingModel
from hytrec.model.vocab import FIRST_ITEM_ROW, UNKNOWN_ROW, Vocab
from tests.helpers_model import make_model, random_history

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_round_trip_same_outputs_and_version(tmp_path) -> None:
    model = make_model()
    ids = [f"item{i}" for i in range(model.cfg.n_items)]
    version = save_checkpoint(tmp_path, model, ids, list(range(model.cfg.n_items)), meta={"epochs": 3})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.version == version and ckpt.version.startswith("hytrec-")
    assert ckpt.vocab == Vocab(ids, list(range(model.cfg.n_items)))
    assert ckpt.meta == {"epochs": 3} and ckpt.model_type == "hytrec"
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
    (tmp_path / "items.json").write_text(json.dumps({"item_ids": ids, "popularity": [0] * (len(ids) - 1)}))
    with pytest.raises(CheckpointError, match="popularity counts"):
        load_checkpoint(tmp_path)
    (tmp_path / "items.json").write_text(json.dumps({"item_ids": ids}))
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="duplicate"):
        save_checkpoint(tmp_path / "dup", model, ["a"] * len(ids), [0] * len(ids))
    (tmp_path / "items.json").unlink()
    with pytest.raises(CheckpointError, match="no items.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, model, ids, [0] * len(ids))
    spec = json.loads((tmp_path / "config.json").read_text())
    spec["config"]["d_model"] = 32
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["demo", "ml1m-hytrec", "ml1m-sasrec"])
def test_published_checkpoints_load_unchanged(tmp_path, name: str) -> None:
    """The bundled checkpoints load with the version their training run recorded, and items.json re-saves
    byte for byte (the vocabulary's format is the one already on disk)."""
    directory = MODELS / name
    recorded = json.loads((directory / "metrics.json").read_text())["model_version"]
    ckpt = load_checkpoint(directory)
    assert ckpt.version == recorded and ckpt.vocab.n_items == ckpt.config.n_items
    raw = json.loads((directory / "items.json").read_text())
    assert ckpt.vocab.ids == raw["item_ids"] and ckpt.vocab.popularity.tolist() == raw["popularity"]
    ckpt.vocab.save(tmp_path / "items.json")
    assert (tmp_path / "items.json").read_bytes() == (directory / "items.json").read_bytes()
    for file in ("model.safetensors", "config.json"):
        shutil.copy(directory / file, tmp_path / file)
    assert load_checkpoint(tmp_path).version == recorded
    if ckpt.model_type != "sasrec":  # the serving lookups are the vocabulary's
        serving = ServingModel(ckpt)
        first = raw["item_ids"][0]
        assert (
            serving.row(first) == FIRST_ITEM_ROW and serving.knows(first) and serving.item_id(FIRST_ITEM_ROW) == first
        )
        assert serving.row("no-such-item") == UNKNOWN_ROW and not serving.knows("no-such-item")
        top = max(range(len(raw["popularity"])), key=lambda i: (raw["popularity"][i], -i))
        assert serving.popular(1).item_ids == [raw["item_ids"][top]]


def test_version_hashes_the_vocabulary_order(tmp_path) -> None:
    """Same weights and config, another id order (or another id): another version, so no state is shared;
    popularity counts alone do not change it."""
    model = make_model()
    ids = [f"item{i}" for i in range(model.cfg.n_items)]
    base = save_checkpoint(tmp_path / "a", model, ids, [0] * len(ids))
    swapped = [ids[1], ids[0], *ids[2:]]
    assert save_checkpoint(tmp_path / "b", model, swapped, [0] * len(ids)) != base
    assert save_checkpoint(tmp_path / "c", model, [*ids[:-1], "new"], [0] * len(ids)) != base
    assert save_checkpoint(tmp_path / "d", model, ids, list(range(len(ids)))) == base
    assert load_checkpoint(tmp_path / "b").version != load_checkpoint(tmp_path / "a").version == base
