"""What every ``hytrec bench`` command shares: isolated runs, the machine record, the JSON and the page header.

* :class:`IsolatedRunner` / :func:`run_isolated`: each call in a fresh process (a ``ProcessPoolExecutor``
  worker forked from a forkserver, one task per worker), so its peak RSS and its timings are its own; a
  deadline, an exception, or the worker's death come back as an :class:`Outcome`, never as a crashed sweep.
* :func:`run_command`: the same for a fresh interpreter (e.g. another checkout's code).
* :class:`Environment` and :class:`BenchPage`: where and how a run happened, as the JSON's ``meta`` and as
  the first lines of its Markdown page, so a page can be re-rendered from its JSON alone.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import typer

Status = Literal["ok", "error", "timeout", "memory"]
GRACE_S = 30.0  # past its deadline a worker ends itself (SIGALRM); this long after it, the parent kills it
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ isolated runs
@dataclass(frozen=True)
class Outcome:
    """The result of one isolated call: ``value`` when ``status == "ok"``, else why not in ``error``."""

    status: Status
    value: Any = None
    error: str = ""
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def unwrap(self) -> Any:
        if not self.ok:
            raise RuntimeError(f"isolated run failed ({self.status}): {self.error}")
        return self.value


def _in_child(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float) -> Any:
    """Run in the worker. SIGALRM's default action ends the process at the deadline, even inside a long C call."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _death(exitcode: int | None, timeout_s: float) -> tuple[Status, str]:
    """Classify a process that ended without a result by its exit code (negative: the signal that killed it)."""
    if exitcode is None:
        return "error", "the process ended abruptly (exit status unknown)"
    if exitcode == -signal.SIGALRM:
        return "timeout", f"killed after {timeout_s:g} s"
    if exitcode == -signal.SIGKILL:  # nothing here sends it: on Linux it is the kernel's OOM killer
        return "memory", "killed by SIGKILL (the signal of the kernel's OOM killer)"
    if exitcode < 0:
        return "error", f"killed by {signal.Signals(-exitcode).name}"
    return "error", f"exited with code {exitcode} without a result"


def _raised(exc: BaseException) -> tuple[Status, str]:
    memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"  # torch's, not imported
    return ("memory" if memory else "error"), f"{type(exc).__name__}: {exc}"


def _workers(pool: ProcessPoolExecutor) -> list[multiprocessing.Process]:
    # The stdlib keeps a dead worker's exit code only on its Process objects, which it does not expose.
    return list((getattr(pool, "_processes", None) or {}).values())


_open_pools: set[ProcessPoolExecutor] = set()  # the harness's pools not yet shut down


def _forkserver(preload: Sequence[str]) -> multiprocessing.context.ForkServerContext:
    """The forkserver context; with ``preload``, its server has imported those modules (and nothing else).

    The server is one per parent process and reads its preload list only when it starts. One running with
    another list is stopped (the stdlib has no public call for that) so the next child starts a new one, but
    only while no pool of ours may be forking from it; else the children import what they need themselves.
    """
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    server = getattr(forkserver, "_forkserver", None)
    if preload and getattr(server, "_preload_modules", None) != list(preload):
        if not _open_pools and getattr(server, "_forkserver_pid", None) is not None and hasattr(server, "_stop"):
            server._stop()
        ctx.set_forkserver_preload(list(preload))
    return ctx


def _open_pool(workers: int, preload: Sequence[str]) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(workers, mp_context=_forkserver(preload), max_tasks_per_child=1)
    _open_pools.add(pool)
    return pool


def _shut(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=True)
    _open_pools.discard(pool)


class IsolatedRunner:
    """Runs each call in a fresh process; a worker that dies breaks the pool, so the next call builds another.

    ``preload``: modules the forkserver imports once (e.g. torch and the models), so each child starts with
    them loaded and nothing computed; without it, children fork from whatever server is running.
    """

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self._preload = tuple(preload)
        self._pool: ProcessPoolExecutor | None = None

    def run(self, fn: Callable[..., Any], /, *args: Any, timeout_s: float, **kwargs: Any) -> Outcome:
        """``fn(*args, **kwargs)`` in a fresh process, ended after ``timeout_s``; ``fn`` must be importable."""
        if self._pool is None:
            self._pool = _open_pool(1, self._preload)
        start = time.monotonic()
        future = self._pool.submit(_in_child, fn, args, kwargs, timeout_s)
        killed = not wait([future], timeout=timeout_s + GRACE_S).done
        if killed:  # fn replaced the SIGALRM handler: end the worker from here
            for p in _workers(self._pool):
                p.kill()
            wait([future])
        exc = future.exception()
        if exc is None:
            return Outcome("ok", future.result(), wall_s=time.monotonic() - start)
        if isinstance(exc, BrokenProcessPool):
            exitcode = self._discard_pool()
            status, error = ("timeout", f"killed after {timeout_s:g} s") if killed else _death(exitcode, timeout_s)
        else:
            status, error = _raised(exc)
        return Outcome(status, error=error, wall_s=time.monotonic() - start)

    def _discard_pool(self) -> int | None:
        """Shut the broken pool down (its manager joins the dead worker) and return that worker's exit code."""
        assert self._pool is not None
        workers = _workers(self._pool)
        _shut(self._pool)
        self._pool = None
        codes = [p.exitcode for p in workers]
        return next((c for c in codes if c), codes[0] if codes else None)

    def close(self) -> None:
        if self._pool is not None:
            _shut(self._pool)
            self._pool = None

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_isolated(fn: Callable[..., Any], /, *args: Any, timeout_s: float, **kwargs: Any) -> Outcome:
    """One call in a fresh process (see :class:`IsolatedRunner`)."""
    with IsolatedRunner() as runner:
        return runner.run(fn, *args, timeout_s=timeout_s, **kwargs)


def run_parallel(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, timeout_s: float) -> list[Any]:
    """``fn(*args)`` for every ``args`` at the same time, each in a fresh process; raises if any fails."""
    pool = _open_pool(len(calls), ())
    try:
        futures = [pool.submit(_in_child, fn, args, {}, timeout_s) for args in calls]
        return [f.result(timeout=timeout_s + GRACE_S) for f in futures]
    finally:
        _shut(pool)


def run_command(
    argv: Sequence[str], *, timeout_s: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Outcome:
    """Run a fresh interpreter (code that must not share this process's imports); its last stdout line is JSON."""
    start = time.monotonic()
    try:
        proc = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", error=f"killed after {timeout_s:g} s", wall_s=time.monotonic() - start)
    if proc.returncode != 0:
        status, error = _death(proc.returncode, timeout_s)
        return Outcome(status, error=f"{error}: {proc.stderr[-2000:]}", wall_s=time.monotonic() - start)
    lines = proc.stdout.strip().splitlines()
    return Outcome("ok", json.loads(lines[-1]) if lines else None, wall_s=time.monotonic() - start)


# ------------------------------------------------------------------------------------- machine and page
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass(frozen=True)
class Environment:
    """The machine and code a run measured. Keys stay flat in ``meta`` (older JSON lacks the newer ones)."""

    cpu: str
    logical_cpus: int | None
    cpus_available: int | None
    torch: str | None
    threads: int | None  # torch threads of the measurements (None: the benchmark sets none)
    omp_wait_policy: str
    python: str
    platform: str
    git_commit: str | None
    git_dirty: bool | None

    @classmethod
    def capture(cls, threads: int | None = None) -> Environment:
        try:
            torch_version: str | None = version("torch")  # without importing torch
        except PackageNotFoundError:
            torch_version = None
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
        return cls(
            cpu=_cpu_name(),
            logical_cpus=os.cpu_count(),
            cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            torch=torch_version,
            threads=threads,
            # OpenMP's default policy is what users get; on a shared machine spinning threads stall each other.
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
            python=platform.python_version(),
            platform=platform.platform(),
            git_commit=commit,
            git_dirty=None if status is None else bool(status),
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Environment:
        return cls(**{f.name: meta.get(f.name) for f in fields(cls)})

    def sentence(self) -> str:
        """The page's "Machine:" line."""
        cpus = f"{self.logical_cpus} logical CPUs"
        if self.cpus_available is not None and self.cpus_available != self.logical_cpus:
            cpus += f" ({self.cpus_available} available to the run)"
        threads = f" with {threads_phrase(self.threads)}" if self.threads is not None else ""
        if self.git_commit is None:
            code = "commit not recorded"
        else:
            code = f"commit {self.git_commit[:12]}" + (" with uncommitted changes" if self.git_dirty else "")
        return (
            f"**Machine:** {self.cpu}, {cpus}, torch {self.torch}{threads} (OMP_WAIT_POLICY={self.omp_wait_policy}), "
            f"Python {self.python}, {self.platform}; {code}."
        )


def threads_phrase(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def default_command() -> str:
    return shlex.join(["hytrec", *sys.argv[1:]])


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class BenchPage:
    """One run's provenance (command, date, wall time, load, :class:`Environment`): the JSON's ``meta``
    (:meth:`meta`, read back by :meth:`from_meta`) and the page's header (:meth:`header`)."""

    command: str
    date: str
    environment: Environment
    load_avg_start: list[float]
    load_avg_end: list[float] | None = None
    wall_s: float | None = None
    quick: bool = False
    _started: float = field(default_factory=time.monotonic, repr=False)

    @classmethod
    def start(cls, command: str | None = None, *, threads: int | None = None, quick: bool = False) -> BenchPage:
        return cls(
            command=command or default_command(),
            date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            environment=Environment.capture(threads),
            load_avg_start=_load_avg(),
            quick=quick,
        )

    def finish(self) -> BenchPage:
        self.load_avg_end, self.wall_s = _load_avg(), round(time.monotonic() - self._started, 1)
        return self

    def meta(self, **extra: Any) -> dict[str, Any]:
        head = {k: getattr(self, k) for k in ("date", "command", "quick", "load_avg_start", "load_avg_end", "wall_s")}
        return {**head, **asdict(self.environment), **extra}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> BenchPage:
        keys = ("command", "date", "load_avg_start", "load_avg_end", "wall_s")
        return cls(
            **{k: meta.get(k) for k in keys}, environment=Environment.from_meta(meta), quick=bool(meta.get("quick"))
        )

    def header(self, title: str, regenerate: str, method: Iterable[str] = ()) -> list[str]:
        """Markdown lines: title, the command that made the page and how to remake it, machine and load, method."""
        wall = f" (wall time {self.wall_s:.0f} s)" if self.wall_s is not None else ""
        load = ""
        if self.load_avg_start is not None:
            load = (
                f" Load average (1/5/15 min) {self.load_avg_start} at the start and {self.load_avg_end} at the end: "
                "the machine is shared, so other jobs may have run alongside; absolute times are this machine's, "
                "compare ratios."
            )
        quick = " **Quick run (--quick): short sweep, not the full benchmark.**" if self.quick else ""
        lines = [
            f"# {title}",
            "",
            f"Generated by `{self.command}` on {self.date}{wall}. Do not edit by hand: {regenerate}",
            "",
            self.environment.sentence() + load + quick,
            "",
        ]
        for paragraph in method:
            lines += [paragraph, ""]
        return lines


# ------------------------------------------------------------------------------------------ outputs
def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def echo_result(result: dict[str, Any], text: str | None = None, *, as_json: bool = True) -> None:
    """Print the result: as JSON, or as ``text`` (the terminal tables) when there is one and JSON was not asked."""
    typer.echo(json.dumps(result, indent=2) if as_json or text is None else text)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r``."""

    def row(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [row(header), "|" + "".join("---|" if a == "l" else "---:|" for a in align), *map(row, rows)]


def package_tree(checkout: Path, into: Path) -> Path:
    """A folder whose ``hytrec`` package is ``checkout``'s code, laid out as its pyproject's package-dir maps it
    (symlinks), so ``PYTHONPATH=<folder>`` imports that checkout and not the installed one."""
    mapping = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        if package == "hytrec":
            (into / "hytrec").mkdir(parents=True, exist_ok=True)
            for f in (checkout / folder).iterdir():
                if f.suffix == ".py":
                    (into / "hytrec" / f.name).symlink_to(f.resolve())
        elif package.count(".") == 1:
            (into / package.replace(".", "/")).symlink_to((checkout / folder).resolve())
    return into
