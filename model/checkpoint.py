"""Checkpoints: a directory with safetensors weights, a JSON config and the item vocabulary.

Files: ``model.safetensors`` (weights only), ``config.json`` (``model_type`` and its config),
``items.json`` (the :class:`~hytrec.model.vocab.Vocab`: external item ids in row order and each item's
training popularity, for the cold-start fallback). The model version is
``<model_type>-<sha256 of config + weights>[:12]``, so different weights never share a version (and never
share serving state); the items file is not part of it. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from hytrec.model.baselines import SASRec, SASRecConfig
from hytrec.model.config import VARIANTS, HyTRecConfig
from hytrec.model.hytrec import HyTRec
from hytrec.model.vocab import Vocab, VocabError

WEIGHTS, CONFIG, ITEMS = "model.safetensors", "config.json", "items.json"
MODEL_TYPES = (*VARIANTS, "sasrec")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds something unexpected."""


@dataclass
class Checkpoint:
    model: nn.Module
    model_type: str
    config: HyTRecConfig | SASRecConfig
    vocab: Vocab  # item ids <-> rows, and training popularity
    version: str
    meta: dict[str, Any]


def build_model(model_type: str, config: dict[str, Any]) -> tuple[nn.Module, HyTRecConfig | SASRecConfig]:
    if model_type == "sasrec":
        cfg = SASRecConfig.from_dict(config)
        return SASRec(cfg), cfg
    if model_type not in VARIANTS:
        raise CheckpointError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    cfg = HyTRecConfig.from_dict({**config, "variant": model_type})
    return HyTRec(cfg), cfg


def model_type_of(model: nn.Module) -> str:
    return "sasrec" if isinstance(model, SASRec) else model.cfg.variant


def _version(model_type: str, config_json: str, weights: Path) -> str:
    digest = hashlib.sha256(config_json.encode())
    digest.update(weights.read_bytes())
    return f"{model_type}-{digest.hexdigest()[:12]}"


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    item_ids: Sequence[str],
    popularity: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> str:
    """Write the checkpoint files and return the model version.

    ``item_ids`` in row order and their training ``popularity`` become ``items.json`` (:class:`Vocab`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    try:
        vocab = Vocab(item_ids, popularity)
    except VocabError as exc:
        raise CheckpointError(f"cannot save the items: {exc}") from exc
    if vocab.n_items != cfg.n_items:
        raise CheckpointError(f"{vocab.n_items} item ids for {cfg.n_items} items")
    model_type = model_type_of(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS)
    config_json = json.dumps({"model_type": model_type, "config": cfg.to_dict(), "meta": meta or {}}, indent=2)
    (directory / CONFIG).write_text(config_json + "\n")
    vocab.save(directory / ITEMS)
    return _version(model_type, config_json + "\n", directory / WEIGHTS)


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (eval mode, CPU)."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, ITEMS):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")
    config_json = (directory / CONFIG).read_text()
    try:
        spec = json.loads(config_json)
        model_type, config = spec["model_type"], spec["config"]
        vocab = Vocab.load(directory / ITEMS)
    except (json.JSONDecodeError, KeyError, TypeError, VocabError) as exc:
        raise CheckpointError(f"checkpoint {directory}: malformed config or items file: {exc}") from exc
    model, cfg = build_model(model_type, config)
    if vocab.n_items != cfg.n_items:
        raise CheckpointError(f"checkpoint {directory}: {vocab.n_items} item ids for {cfg.n_items} items")
    try:
        model.load_state_dict(load_file(directory / WEIGHTS, device="cpu"))
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {directory}: weights do not match the config: {exc}") from exc
    model.eval()
    version = _version(model_type, config_json, directory / WEIGHTS)
    return Checkpoint(model, model_type, cfg, vocab, version, spec.get("meta", {}))
