"""The admin reload path check: a model path resolving outside HYTREC_MODEL_ROOT is refused, however spelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from hytrec.service.errors import install
from hytrec.service.paths import ModelPathError, resolve_model_path
from hytrec.service.settings import Settings


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "models"
    (root / "v1").mkdir(parents=True)
    (root / "v2" / "inner").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "escape").symlink_to(outside)  # a link inside the root pointing out of it
    (root / "v1" / "link-to-v2").symlink_to(root / "v2")  # a link that stays inside
    (root / "file.txt").write_text("x")
    return root, outside


def test_paths_inside_the_root_resolve(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert resolve_model_path("v1", root) == (root / "v1").resolve()
    assert resolve_model_path(str(root / "v2"), root) == (root / "v2").resolve()
    assert resolve_model_path("v2/inner/..", root) == (root / "v2").resolve()
    assert resolve_model_path("v1/link-to-v2", root) == (root / "v2").resolve()
    assert resolve_model_path(".", root) == root.resolve()


@pytest.mark.parametrize(
    "path",
    ["..", "../secret", "v1/../../secret", "escape", "escape/", "/etc", "/", "//etc/passwd", "v1/../.."],
)
def test_paths_resolving_outside_are_refused(tree: tuple[Path, Path], path: str) -> None:
    root, _ = tree
    with pytest.raises(ModelPathError) as err:
        resolve_model_path(path, root)
    assert err.value.status == 422 and "outside HYTREC_MODEL_ROOT" in err.value.detail
    assert err.value.extra["errors"][0]["field"] == "path"


def test_outside_is_refused_before_existence_is_checked(tree: tuple[Path, Path]) -> None:
    """A missing path outside gets the same answer as an existing one: nothing is learnt about the filesystem."""
    root, outside = tree
    there = resolve_error(str(outside), root)
    missing = resolve_error(str(outside.parent / "no-such-dir"), root)
    assert there.status == missing.status == 422
    assert "outside" in there.detail and "outside" in missing.detail


def resolve_error(path: str, root: Path | None) -> ModelPathError:
    with pytest.raises(ModelPathError) as err:
        resolve_model_path(path, root)
    return err.value


def test_missing_files_empty_nul_and_no_root(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert "not a checkpoint directory" in resolve_error("nope", root).detail
    assert "not a checkpoint directory" in resolve_error("file.txt", root).detail
    assert "NUL" in resolve_error("v1\x00", root).detail
    assert "non-empty" in resolve_error("", root).detail
    off = resolve_error("v1", None)
    assert off.status == 403 and "HYTREC_MODEL_ROOT" in off.detail
    assert Settings().model_root is None
    assert Settings(model_root=str(root)).model_root == root


def test_a_route_that_lets_it_propagate_answers_a_problem_document(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    app = FastAPI()
    install(app, 1)

    @app.post("/v1/admin/model")
    async def load(body: dict[str, str]) -> dict[str, str]:
        return {"path": str(resolve_model_path(body["path"], root))}

    async def post(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.post("/v1/admin/model", json={"path": path})

    ok = asyncio.run(post("v1"))
    assert ok.status_code == 200 and ok.json()["path"] == str((root / "v1").resolve())
    r = asyncio.run(post("../secret"))
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/model-path") and r.json()["errors"][0]["field"] == "path"
