"""The shared benchmark harness: isolated runs and how they fail, the machine record, the page header.

The children run standard-library callables where they can, so little has to import in them.
"""

from __future__ import annotations

import operator
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from hytrec.benchmarks.harness import BenchPage, Environment, IsolatedRunner, markdown_table, run_command, run_parallel


@pytest.fixture
def runner() -> Iterator[IsolatedRunner]:
    with IsolatedRunner() as r:
        yield r


def test_a_run_returns_the_childs_result_from_a_fresh_process(runner: IsolatedRunner) -> None:
    out = runner.run(operator.add, 2, 3, timeout_s=30)
    assert out.ok and out.value == 5 and out.wall_s > 0
    pids = {runner.run(os.getpid, timeout_s=30).unwrap() for _ in range(3)}
    assert len(pids) == 3 and os.getpid() not in pids  # one task per worker


def test_an_exception_is_an_error_with_its_message(runner: IsolatedRunner) -> None:
    out = runner.run(int, "not a number", timeout_s=30)
    assert out.status == "error" and out.value is None
    assert out.error.startswith("ValueError:") and "not a number" in out.error
    with pytest.raises(RuntimeError, match="ValueError"):
        out.unwrap()
    assert runner.run(operator.mul, 6, 7, timeout_s=30).value == 42


def test_a_child_past_its_deadline_is_a_timeout(runner: IsolatedRunner) -> None:
    start = time.monotonic()
    out = runner.run(time.sleep, 60, timeout_s=0.5)
    assert out.status == "timeout" and "0.5 s" in out.error
    assert time.monotonic() - start < 10
    assert runner.run(operator.add, 1, 1, timeout_s=30).value == 2  # a new pool after the broken one


def test_a_child_killed_by_sigkill_is_memory_and_the_pool_goes_on(runner: IsolatedRunner) -> None:
    out = runner.run(signal.raise_signal, signal.SIGKILL, timeout_s=30)
    assert out.status == "memory" and "SIGKILL" in out.error
    out = runner.run(signal.raise_signal, signal.SIGTERM, timeout_s=30)
    assert out.status == "error" and "SIGTERM" in out.error
    assert runner.run(operator.add, 2, 2, timeout_s=30).value == 4


def _loaded(name: str) -> bool:
    return name in sys.modules


def test_the_forkserver_preloads_what_the_runner_asks_for() -> None:
    """A server running with another preload list is replaced, once no pool forks from it (the modules: stdlib
    ones nothing else here imports)."""
    with IsolatedRunner(preload=("colorsys",)) as r:
        assert r.run(_loaded, "colorsys", timeout_s=30).value is True
    with IsolatedRunner(preload=("wave",)) as r:
        assert r.run(_loaded, "wave", timeout_s=30).value is True
        assert r.run(_loaded, "colorsys", timeout_s=30).value is False


def test_parallel_runs_and_commands() -> None:
    pids = run_parallel(os.getpid, [(), (), ()], timeout_s=30)
    assert len(set(pids)) == 3
    ok = run_command([sys.executable, "-c", "print('noise'); print('[1, 2]')"], timeout_s=30)
    assert ok.ok and ok.value == [1, 2]
    failed = run_command([sys.executable, "-c", "import sys; sys.exit('boom')"], timeout_s=30)
    assert failed.status == "error" and "code 1" in failed.error and "boom" in failed.error
    slow = run_command([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5)
    assert slow.status == "timeout"


def test_page_meta_round_trips_and_renders_the_header() -> None:
    page = BenchPage.start("hytrec bench x", threads=2, quick=True).finish()
    meta = page.meta(settings={"a": 1})
    assert meta["command"] == "hytrec bench x" and meta["threads"] == 2 and meta["settings"] == {"a": 1}
    assert meta["python"] and meta["wall_s"] >= 0 and len(meta["load_avg_end"]) == 3
    assert BenchPage.from_meta(meta).meta(settings={"a": 1}) == meta
    head = "\n".join(page.header("Title", "rerun it.", ["How it was measured."]))
    assert head.startswith("# Title\n") and "`hytrec bench x`" in head and "How it was measured." in head
    assert "with 2 threads" in head and "Quick run" in head
    old = Environment.from_meta({"cpu": "c", "logical_cpus": 2, "torch": "t", "threads": 1})  # JSON of before
    assert "commit not recorded" in old.sentence() and "2 logical CPUs, torch t with 1 thread (" in old.sentence()


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, ""], ["x", 2.5]], "lr") == [
        "| a | b |",
        "|---|---:|",
        "| 1 | |",
        "| x | 2.5 |",
    ]
