"""Where an admin route may load a model from: only directories inside ``HYTREC_MODEL_ROOT``.

A path given over HTTP is a client's input. ``resolve_model_path`` resolves it (symlinks and ``..`` included)
and refuses anything that ends up outside the configured root, before it checks that the directory exists, so
the answer does not tell whether a path outside the root exists. With no root configured, no path is loaded
over HTTP at all (fail closed). The error is a problem document (422 naming the ``path`` field, 403 while no
root is set), so a route only has to let it propagate.
"""

from __future__ import annotations

from pathlib import Path

from hytrec.service.errors import Problem


class ModelPathError(Problem):
    """A model path refused: answered as a problem document of type ``model-path``."""

    def __init__(self, detail: str, status: int = 422) -> None:
        field = {"field": "path", "in": "body", "message": detail, "type": "model_path"}
        super().__init__(status, "model-path", "Model path refused", detail, errors=[field])


def resolve_model_path(path: str | Path, root: Path | None) -> Path:
    """The directory ``path`` names, resolved, if it lies inside ``root``; else ``ModelPathError``.

    A relative ``path`` is taken relative to ``root``.
    """
    if root is None:
        raise ModelPathError("loading a model by path is off: set HYTREC_MODEL_ROOT to allow a directory", 403)
    text = str(path)
    if not text or "\x00" in text:
        raise ModelPathError("the model path must be a non-empty path without NUL bytes")
    base = Path(root).resolve()
    resolved = (base / text).resolve()  # an absolute path replaces base; symlinks and '..' are followed
    if not resolved.is_relative_to(base):
        raise ModelPathError(f"model path {text!r} resolves outside HYTREC_MODEL_ROOT")
    if not resolved.is_dir():
        raise ModelPathError(f"model path {text!r} is not a checkpoint directory under HYTREC_MODEL_ROOT")
    return resolved
