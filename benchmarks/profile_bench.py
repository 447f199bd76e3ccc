"""Profile of one ``hytrec serve`` worker under open-loop load: py-spy, attached from outside the process.

py-spy samples the worker's Python stacks by reading its memory (ptrace; in a container that needs
CAP_SYS_PTRACE or ``kernel.yama.ptrace_scope`` 0, checked by :func:`check_pyspy`), so the service runs
unchanged. Under one continuous load two recordings follow each other: a flame graph (SVG) and the same
stacks in py-spy's ``raw`` (collapsed) format, which :func:`top_functions` turns into the page's table. Idle
threads (the event loop waiting in epoll, executor threads waiting for work) are left out, as py-spy does by
default, so the shares are of the time the worker spent running Python or code called from it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def pyspy() -> str | None:
    """The py-spy executable next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def check_pyspy(exe: str) -> str | None:
    """None if py-spy can read a Python process here; else why not (its error)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        out = subprocess.run([exe, "dump", "--pid", str(child.pid)], capture_output=True, text=True, timeout=30)
        return None if out.returncode == 0 else (out.stderr or out.stdout).strip()[-500:]
    finally:
        child.kill()
        child.wait()


def frame_name(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame ``func (file:line)``; the file shortened to its package part."""
    m = _FRAME.match(frame.strip())
    return (m["func"], m["file"]) if m else (frame.strip(), "")


OWN_CODE = ("model/", "service/", "state_store/")  # py-spy's short file names of HyTRec's own packages


def top_functions(raw: str, n: int = 15) -> dict[str, Any]:
    """Self sample counts per (function, file), and inclusive ones for HyTRec's own code (the use cases and what
    they call; every stack's framework frames, and ``hytrec serve`` itself, would otherwise top that list), from
    py-spy's collapsed stacks (one ``frame;frame;...;leaf count`` line per distinct stack; the first frames name
    the process and thread)."""
    own: Counter[tuple[str, str]] = Counter()
    incl: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        c = int(count)
        total += c
        own[frames[-1]] += c
        for fr in {f for f in frames if f[1].startswith(OWN_CODE) and f[1] != "service/commands.py"}:
            incl[fr] += c

    def rows(counter: Counter[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"function": f, "file": p, "samples": c, "share": c / total} for (f, p), c in counter.most_common(n)]

    return {"samples": total, "self": rows(own), "inclusive": rows(incl)}


def record(exe: str, pid: int, seconds: float, fmt: str, out: Path, rate: int) -> dict[str, Any]:
    """One py-spy recording (blocking); its command line and how it ended."""
    argv = [exe, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", str(rate), "--format", fmt]
    argv += ["--output", str(out), "--nolineno"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    shown = " ".join(["py-spy", *argv[1:3], "<worker pid>", *argv[4:-3], "--output", out.name, "--nolineno"])
    return {"command": shown, "rc": done.returncode, "stderr": done.stderr[-500:]}


class Recorder(threading.Thread):
    """Both recordings of one worker, started at ``at`` (``time.perf_counter()``), back to back: the flame graph
    to ``svg``, the collapsed stacks to ``raw``."""

    def __init__(self, exe: str, pid: int, at: float, seconds: float, svg: Path, raw: Path, rate: int) -> None:
        super().__init__(daemon=True)
        self.args = exe, pid, seconds, rate
        self.at, self.svg, self.raw = at, svg, raw
        self.result: dict[str, Any] = {}

    def run(self) -> None:
        exe, pid, seconds, rate = self.args
        time.sleep(max(0.0, self.at - time.perf_counter()))
        self.result["flamegraph"] = record(exe, pid, seconds, "flamegraph", self.svg, rate)
        self.result["raw"] = record(exe, pid, seconds, "raw", self.raw, rate)
