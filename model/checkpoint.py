"""Checkpoints: a directory with safetensors weights, a JSON config and the item vocabulary.

Files: ``model.safetensors`` (weights only), ``config.json`` (``model_type`` and its config),
``items.json`` (the :class:`~hytrec.model.vocab.Vocab`: external item ids in row order and each item's
training popularity, for the cold-start fallback). The model version is
``<model_type>-<sha256 of config + weights + item ids in row order>[:12]``, so different weights or a changed
vocabulary (ids added, removed or reordered) never share a version, and never read each other's serving state.
Nothing is unpickled.

Writes are atomic (:func:`save_checkpoint`): every file is written and fsynced in a temporary directory
beside the target first. A new directory appears by one ``rename``; into an existing one (a training run's
directory, which holds other files too) the files are renamed one by one with ``config.json`` last, and
``config.json`` records the sha256 of the weights and items files, so a write stopped between two renames
leaves files that :func:`validate_checkpoint` rejects (digest mismatch), never a mix it accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hytrec.model.baselines import SASRec, SASRecConfig
from hytrec.model.config import VARIANTS, HyTRecConfig
from hytrec.model.hytrec import HyTRec
from hytrec.model.vocab import Vocab, VocabError

WEIGHTS, CONFIG, ITEMS = "model.safetensors", "config.json", "items.json"
MODEL_TYPES = (*VARIANTS, "sasrec")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


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


def _version(model_type: str, config_json: str, weights: Path, vocab: Vocab) -> str:
    spec = json.loads(config_json)
    if "files" in spec:  # the file digests are not part of the version: weights and ids are hashed themselves
        del spec["files"]
        config_json = json.dumps(spec, indent=2) + "\n"
    digest = hashlib.sha256(config_json.encode())
    digest.update(weights.read_bytes())
    # Row order matters (a state stores rows, not ids); NUL cannot occur in an id, so the join is unambiguous.
    digest.update("\0".join(vocab.ids).encode())
    return f"{model_type}-{digest.hexdigest()[:12]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp)`` fill a fresh temporary directory beside ``target``, fsync it, then rename it to
    ``target``; an existing ``target`` is first renamed to ``<target>.old`` and removed after the swap.

    Between the two renames only ``<target>.old`` exists (readers fall back to it); at no point does
    ``target`` name a partly written directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
    cfg = model.cfg
    try:
        vocab = Vocab(item_ids, popularity)
    except VocabError as exc:
        raise CheckpointError(f"cannot save the items: {exc}") from exc
    if vocab.n_items != cfg.n_items:
        raise CheckpointError(f"{vocab.n_items} item ids for {cfg.n_items} items")
    model_type = model_type_of(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config_json = ""

    def write(tmp: Path) -> None:
        nonlocal config_json
        save_file(state, tmp / WEIGHTS)
        vocab.save(tmp / ITEMS)
        files = {name: _sha256(tmp / name) for name in (WEIGHTS, ITEMS)}
        spec = {"model_type": model_type, "config": cfg.to_dict(), "meta": meta or {}, "files": files}
        config_json = json.dumps(spec, indent=2) + "\n"
        (tmp / CONFIG).write_text(config_json)

    if not directory.exists():
        write_dir_atomically(directory, write)
    else:  # a directory with other files (a run's): rename file by file, config.json (the digests) last
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.ckpt-", dir=directory.parent))
        try:
            write(tmp)
            for name in (WEIGHTS, ITEMS, CONFIG):
                _fsync(tmp / name)
            for name in (WEIGHTS, ITEMS, CONFIG):
                os.replace(tmp / name, directory / name)
            _fsync(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _version(model_type, config_json, directory / WEIGHTS, vocab)


def _read_spec(directory: Path) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """``config.json``: its text (hashed into the version), model type, model config and meta."""
    path = directory / CONFIG
    try:
        config_json = path.read_bytes().decode("utf-8")
        spec = json.loads(config_json)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path}: malformed config, not UTF-8 JSON: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("model_type"), str):
        raise CheckpointError(f"{path}: malformed config, expected an object with a string 'model_type'")
    config, meta = spec.get("config"), spec.get("meta", {})
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: malformed config, 'config' and 'meta' must be objects")
    if not isinstance(spec.get("files", {}), dict):
        raise CheckpointError(f"{path}: malformed config, 'files' must be an object")
    return config_json, spec["model_type"], config, meta


def _check_digests(directory: Path) -> None:
    """The sha256 that config.json records for each file (checkpoints written before it recorded none pass)."""
    files = json.loads((directory / CONFIG).read_text()).get("files", {})
    for name, digest in files.items():
        if name in (WEIGHTS, ITEMS) and _sha256(directory / name) != digest:
            raise CheckpointError(
                f"{directory / name}: its sha256 is not the one {CONFIG} records (a write that stopped half-way, "
                "or a file changed by hand)"
            )


def _expected_tensors(path: Path, model_type: str, config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every weight the config's model has, built without allocating it."""
    try:
        with torch.device("meta"):
            model, _ = build_model(model_type, config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: malformed config: {exc}") from exc
    return {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype))) for k, v in model.state_dict().items()}


def _check_weights(path: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The weights file's header against the config: a complete file, every tensor there with its shape and dtype."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a complete safetensors file: {exc}") from exc
    problems = [f"missing tensor {k!r}" for k in expected if k not in found]
    problems += [f"unexpected tensor {k!r}" for k in found if k not in expected]
    problems += [
        f"tensor {k!r} is {found[k][1]}{list(found[k][0])}, the config expects {want[1]}{list(want[0])}"
        for k, want in expected.items()
        if k in found and found[k] != want
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{path}: weights do not match the config: {shown}")


def validate_checkpoint(directory: str | Path) -> None:
    """Check a checkpoint without loading its weights: the files are there, the JSON files parse, the
    safetensors header holds exactly the tensors (names, shapes, dtypes) the config's model has, and the
    weights and items files have the sha256 that config.json records (when it records them).

    Raises :class:`CheckpointError` naming the file (and the tensor) at fault; cheap enough for a CLI to call
    before it starts workers.
    """
    _validate(Path(directory))
    _check_digests(Path(directory))


def _validate(directory: Path) -> tuple[str, str, dict[str, Any], dict[str, Any], Vocab]:
    for name in (WEIGHTS, CONFIG, ITEMS):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")
    config_json, model_type, config, meta = _read_spec(directory)
    try:
        vocab = Vocab.load(directory / ITEMS)
    except (VocabError, OSError) as exc:
        raise CheckpointError(f"checkpoint {directory}: malformed items file: {exc}") from exc
    n_items = config.get("n_items")
    if vocab.n_items != n_items:
        raise CheckpointError(f"checkpoint {directory}: {vocab.n_items} item ids for {n_items} items")
    _check_weights(directory / WEIGHTS, _expected_tensors(directory / CONFIG, model_type, config))
    return config_json, model_type, config, meta, vocab


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (eval mode, CPU).

    Only safetensors and JSON are read (nothing is unpickled); any broken file raises :class:`CheckpointError`
    naming it (see :func:`validate_checkpoint`), before any weight is allocated.
    """
    directory = Path(directory)
    config_json, model_type, config, meta, vocab = _validate(directory)
    model, cfg = build_model(model_type, config)
    path = directory / WEIGHTS
    try:
        weights = load_file(path, device="cpu")
        model.load_state_dict(weights)
    except (SafetensorError, OSError, RuntimeError) as exc:  # the file changed since it was checked
        raise CheckpointError(f"{path}: weights do not match the config: {exc}") from exc
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")
    _check_digests(directory)
    model.eval()
    version = _version(model_type, config_json, path, vocab)
    return Checkpoint(model, model_type, cfg, vocab, version, meta)
