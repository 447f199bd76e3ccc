"""Atomic checkpoint writes: a write stopped at any point leaves the old checkpoint, the new one, or files
that validate_checkpoint rejects; never a mix it accepts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hytrec.model import checkpoint as ckpt_mod
from hytrec.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, validate_checkpoint
from tests.helpers_model import make_model


class Interrupted(BaseException):
    """Stands for the process dying at that instant (BaseException: nothing catches it on the way out)."""


def _generation(directory: Path) -> str | None:
    """Which write a checkpoint holds: 'old', 'new', or None when validate_checkpoint rejects it."""
    try:
        validate_checkpoint(directory)
    except CheckpointError:
        return None
    loaded = load_checkpoint(directory)
    marks = {float(loaded.model.item_emb.weight[2, 0].detach()), loaded.vocab.popularity[0]}
    assert len(marks) == 1, f"weights of one write, items of another, accepted: {marks}"
    return {1.0: "old", 2.0: "new"}[marks.pop()]


def _model(mark: float):
    model = make_model(n_items=20)
    with torch.no_grad():
        model.item_emb.weight[2, 0] = mark
    return model


def _save(directory: Path, mark: int) -> None:
    ids = [str(i) for i in range(20)]
    save_checkpoint(directory, _model(float(mark)), ids, [mark] * 20)


@pytest.mark.parametrize("existing", [True, False], ids=["into-a-run-directory", "new-directory"])
def test_an_interrupted_write_is_never_accepted_half_done(tmp_path: Path, monkeypatch, existing: bool) -> None:
    """Stop the write before each rename it makes: every outcome is old, new or
    rejected; the run directory's other files are untouched and no temporary directory stays behind."""
    outcomes = set()
    for stop_at in range(5):
        directory = tmp_path / f"run{stop_at}"
        if existing:
            _save(directory, 1)
            (directory / "log.jsonl").write_text("kept\n")
        calls = {"n": 0}
        real_replace, real_rename = os.replace, Path.rename

        def counting(real, directory=directory, calls=calls, stop_at=stop_at):
            def wrapped(src, dst, *args, **kwargs):
                if directory in (Path(dst), Path(dst).parent):  # the renames that publish the checkpoint
                    if calls["n"] == stop_at:
                        raise Interrupted
                    calls["n"] += 1
                return real(src, dst, *args, **kwargs)

            return wrapped

        monkeypatch.setattr(ckpt_mod.os, "replace", counting(real_replace))
        monkeypatch.setattr(Path, "rename", counting(real_rename))
        try:
            _save(directory, 2)
        except Interrupted:
            pass
        finally:
            monkeypatch.undo()
        generation = _generation(directory) if directory.exists() else None
        outcomes.add((stop_at, generation))
        if existing:
            assert (directory / "log.jsonl").read_text() == "kept\n"
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".ckpt-" in p.name]
    if existing:  # 3 renames: before the 1st the old one is intact, after the 3rd the new one; between, rejected
        assert outcomes == {(0, "old"), (1, None), (2, None), (3, "new"), (4, "new")}
    else:  # one rename: nothing, then the new one
        assert outcomes == {(0, None), (1, "new"), (2, "new"), (3, "new"), (4, "new")}


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from tests.helpers_model import make_model
    from hytrec.model.checkpoint import save_checkpoint
    ids = [str(i) for i in range(20)]
    model = make_model(n_items=20, d_model=64)
    print("ready", flush=True)
    mark = 1
    while True:
        mark = 3 - mark
        with torch.no_grad():
            model.item_emb.weight[2, 0] = float(mark)
        save_checkpoint(Path(sys.argv[1]), model, ids, [mark] * 20)
    """
)


def test_sigkill_during_repeated_writes_leaves_an_acceptable_checkpoint_or_a_rejected_one(tmp_path: Path) -> None:
    """A real process rewriting one checkpoint as fast as it can, killed at several moments."""
    repo = Path(__file__).resolve().parents[1]
    seen = []
    for delay in (0.05, 0.13, 0.29):
        directory = tmp_path / f"k{delay}"
        _save(directory, 1)
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory)], cwd=repo, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        seen.append(_generation(directory))  # asserts inside: weights and items of one write
    assert all(g in ("old", "new", None) for g in seen)
