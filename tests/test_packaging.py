"""Packaging: every module imports under `hytrec.*` only, and the demo checkpoint ships with the package."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import hytrec

TOP_LEVEL = ("model", "service", "state_store", "training", "benchmarks", "loadtest")


def test_no_module_is_loaded_under_two_names() -> None:
    """A module imported as both `model.x` and `hytrec.model.x` would run twice (and register its Prometheus
    metrics twice); so every module is imported, then each source file must back exactly one module name."""
    names = [m.name for m in pkgutil.walk_packages(hytrec.__path__, "hytrec.")]
    for pkg in ("hytrec." + name for name in TOP_LEVEL):
        names += [m.name for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + ".")]
    for name in names:
        importlib.import_module(name)
    assert not [m for m in sys.modules if m.split(".")[0] in TOP_LEVEL]
    root = Path(hytrec.__file__).resolve().parents[1]
    sources = [root / d for d in (*TOP_LEVEL, "hytrec", "models")]
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and any(Path(path).resolve().is_relative_to(d) for d in sources):
            by_file.setdefault(str(Path(path).resolve()), []).append(name)
    assert {f: n for f, n in by_file.items() if len(n) > 1} == {}
    assert len(by_file) >= 40  # the walk really imported the tree
    assert "hytrec.service.app" in names and "hytrec.state_store.store" in names


def test_serve_defaults_to_the_packaged_demo_from_any_directory(tmp_path: Path) -> None:
    code = "from hytrec.service.settings import Settings; m = Settings().model; print(m, (m / 'config.json').is_file())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, found = out.stdout.split()
    assert found == "True" and Path(path).is_absolute()
