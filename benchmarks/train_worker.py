"""The timed side of ``hytrec bench train``, run as a script in a fresh interpreter per checkout.

    python benchmarks/train_worker.py CHECKOUT DATA MODEL_TYPE BATCHES BATCH_TOKENS THREADS

It imports the model and training code of CHECKOUT, not of the installed package, so one script times
this checkout and an older one alike. It imports nothing of ``hytrec`` before :func:`use_checkout` points
the imports at CHECKOUT: a module imported earlier would come from the installed checkout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Maps ``hytrec`` and ``hytrec.<pkg>`` to the checkout's folders, as its pyproject's package-dir says.

    First on ``sys.meta_path``, so it wins over the installed (editable) package's finder; submodules
    follow from their package's ``__path__``.
    """

    def __init__(self, root: Path, package_dir: dict[str, str]) -> None:
        self.root, self.package_dir = root, package_dir

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.package_dir:
            return None
        folder = self.root / self.package_dir[fullname]
        if not (folder / "__init__.py").is_file():
            raise ModuleNotFoundError(f"{fullname}: {folder} is not a package in this checkout", name=fullname)
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def use_checkout(root: Path) -> str:
    """Make ``root``'s code the one imported; return the prefix its packages import under.

    A checkout whose pyproject maps ``hytrec.model`` to a folder imports as ``hytrec.*``; an older one
    imports its top-level folders (``model``, ``training``) directly.
    """
    pyproject = root / "pyproject.toml"
    tool = tomllib.loads(pyproject.read_text()).get("tool", {}) if pyproject.is_file() else {}
    package_dir = tool.get("setuptools", {}).get("package-dir", {})
    if "hytrec.model" in package_dir:
        sys.meta_path.insert(0, _CheckoutFinder(root, package_dir))
        return "hytrec."
    sys.path.insert(0, str(root))
    return ""


def time_training(
    root: Path, data: str, model_type: str, batches: int, batch_tokens: int, threads: int
) -> dict[str, Any]:
    """Time one pass over the first ``batches`` batches of a seeded epoch (after one warm-up pass)."""
    prefix = use_checkout(root)

    def code(name: str) -> ModuleType:
        return importlib.import_module(prefix + name)

    import numpy as np
    import torch

    checkpoint, data_mod, train = code("model.checkpoint"), code("training.data"), code("training.train")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    split = data_mod.leave_one_out(data_mod.Interactions.from_file(data))
    cfg = train.TrainConfig(model_type=model_type, batch_tokens=batch_tokens, lr=2e-3)
    model, _ = checkpoint.build_model(model_type, cfg.model_config(split.data.vocab.n_items))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    seq_len = cfg.max_len + 1 if cfg.max_len else None
    epoch = list(data_mod.train_batches(split.train, batch_tokens, seed=np.random.default_rng(0), max_len=seq_len))
    chosen = epoch[:batches]

    def one_pass() -> float:
        start = time.perf_counter()
        for b in chosen:
            loss = train.next_item_loss(model, b.to_torch(), cfg, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # no gradient clipping: the step's cost, not the trainer's recipe
            opt.step()
        return time.perf_counter() - start

    one_pass()
    return {
        "targets": sum(int(b.lengths.sum()) - len(b) for b in chosen),
        "epoch_targets": sum(int(b.lengths.sum()) - len(b) for b in epoch),
        "seconds": one_pass(),
        "code": str(Path(checkpoint.__file__).resolve().parent.parent),
    }


if __name__ == "__main__":
    if len(sys.argv) != 7:
        raise SystemExit(__doc__)
    src, data_file, mt, nb, bt, th = sys.argv[1:]
    print(json.dumps(time_training(Path(src), data_file, mt, int(nb), int(bt), int(th))))
