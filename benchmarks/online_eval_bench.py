"""``hytrec bench online-eval``: the hot-path cost of online evaluation, every user sampled against none, in one run.

Two ``hytrec serve`` (one worker each, each with its own embedded Redis, the serving benchmark's 100,000-item
checkpoint) differ only in ``HYTREC_IMPRESSION_SAMPLE`` (1.0 and 0.0). Both get the same pre-warmed users and
the same open-loop load (the serving benchmark's generator and mix: 80 % recommendations, 20 % event posts),
in ABBA order so drift on a shared machine falls on both alike. Reported per arm: p50/p99 of each endpoint
and the server's CPU seconds per request (from /proc), and the ratios sampled / unsampled; and, in this
process against an embedded Redis, the CPU microseconds of ``record`` and of the writer per impression.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks import serving_bench as sb


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Arm:
    """One server with a given impression sample."""

    def __init__(self, ckpt: Path, sample: float, logs: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.sample = sample
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="hytrec-bench-online-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYTREC_")}
        env.update(HYTREC_MODEL=str(ckpt), HYTREC_PORT=str(self.port), HYTREC_DATA_DIR=str(self.data))
        env.update(HYTREC_IMPRESSION_SAMPLE=str(sample), HYTREC_WORKERS="1")
        self.log = logs / f"online-{sample:g}.log"
        with open(self.log, "wb") as log:
            argv = [sys.executable, "-m", "hytrec.cli", "serve"]
            self.proc = subprocess.Popen(argv, cwd=self.data, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.runs: list[dict[str, Any]] = []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def summarise(arm: Arm) -> dict[str, Any]:
    out: dict[str, Any] = {"sample": arm.sample, "rounds": len(arm.runs)}
    n = sum(r["requests"] for r in arm.runs)
    out["cpu_ms_per_request"] = 1000 * sum(r["cpu_s"] for r in arm.runs) / n
    for name in ("recommend", "events"):
        eps = [r["run"]["endpoints"][name] for r in arm.runs]
        codes = sorted({c for e in eps for c in e["status"]})
        out[name] = {
            "p50_ms": sum(e["latency_ms"]["p50"] for e in eps) / len(eps),
            "p99_ms": sum(e["latency_ms"]["p99"] for e in eps) / len(eps),
            "answer_rps": sum(e["answer_rps"] for e in eps) / len(eps),
            "status": {c: sum(e["status"].get(c, 0) for e in eps) for c in codes},
        }
    return out


async def micro_costs(data_dir: Path, n: int = 20_000) -> dict[str, float]:
    """CPU microseconds per answer of ``record`` (unsampled, sampled) and of the writer per impression (8 and
    256 per pipeline), in this process against an embedded Redis."""
    from hytrec.service.online_eval import ImpressionLog
    from hytrec.service.schemas import Recommendations, ScoredItem
    from hytrec.state_store import StoreSettings, open_store

    store = await open_store(StoreSettings(data_dir=data_dir))
    answers = [
        Recommendations(
            user_id=f"user{u}",
            items=[ScoredItem(item_id=f"i{(u + j) % 100_000}", score=1.0) for j in range(10)],
            model_version="v",
            history_length=1,
            fallback=False,
            request_time=1.7e9,
            had_state=True,
            filtered_out=0,
            exhausted=False,
        )
        for u in range(n)
    ]
    out: dict[str, float] = {}
    try:
        for sample in (0.0, 1.0):
            log = ImpressionLog(
                store.client, "m", sample=sample, max_k=10, window_s=600, log_max=100_000, flush_max=256, buffer=n
            )
            t = time.process_time()
            for a in answers:
                log.record(a)
            out[f"record_us_sample_{sample:g}"] = (time.process_time() - t) / n * 1e6
            await log.flush()
        for per in (8, 256):
            log.flush_max = per
            for a in answers:
                log.record(a)
            t = time.process_time()
            await log.flush()
            out[f"writer_us_per_impression_{per}_per_pipeline"] = (time.process_time() - t) / n * 1e6
    finally:
        await store.close()
    return out


def bench_online_eval(
    rate: Annotated[float, typer.Option("--rate", help="Offered load, req/s.")] = 100.0,
    duration: Annotated[float, typer.Option("--duration", help="Measured seconds per round.")] = 15.0,
    rounds: Annotated[int, typer.Option("--rounds", help="ABBA pairs.")] = 2,
    n_items: Annotated[int, typer.Option("--n-items", help="Catalogue size of the checkpoint.")] = 100_000,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the result here.")] = None,
) -> None:
    """Online evaluation's cost on the serving path: every user sampled against none, one run (ratios)."""
    s = sb.Settings(n_items=n_items)
    work = Path(tempfile.mkdtemp(prefix="hytrec-bench-online-"))
    ckpt = work / "ckpt"
    sb.make_checkpoint(str(ckpt), s.n_items, s.d_model, s.state_dtype)
    import asyncio

    micro = asyncio.run(micro_costs(work / "micro"))
    typer.echo(f"in process: {json.dumps(micro)}", err=True)
    arms = [Arm(ckpt, 1.0, work), Arm(ckpt, 0.0, work)]
    try:
        for arm in arms:
            srv = sb.Server.__new__(sb.Server)  # only its wait_ready: url, proc, log
            srv.url, srv.proc, srv.log = arm.url, arm.proc, arm.log
            srv.wait_ready()
        from hytrec.loadtest.wire import Target
        from hytrec.loadtest.workload import fetch_items

        items = sb._loop(fetch_items(Target(arms[0].url), None, 1000, s.n_items))
        for arm in arms:
            sb.prewarm(arm.url, s, items[0])
        w = sb.workload(s, items)
        for arm in arms:  # a first round each, not counted: JIT-free, but caches, pools and the allocator warm
            sb.sweep(arm.url, w, [rate], s, 5.0, 0.0)
        order = [a for _ in range(rounds) for a in (arms[0], arms[1], arms[1], arms[0])]
        for i, arm in enumerate(order):
            before = cpu_s(arm.proc.pid)
            (run,) = sb.sweep(arm.url, w, [rate], s, duration, 0.0, index=i)
            spent = cpu_s(arm.proc.pid) - before
            arm.runs.append({"run": run, "cpu_s": spent, "requests": run["endpoints"]["all"]["answered"]})
            rec = run["endpoints"]["recommend"]["latency_ms"]
            typer.echo(f"round {i}: sample {arm.sample:g}: recommend p50 {rec['p50']} p99 {rec['p99']} ms", err=True)
        on, off = summarise(arms[0]), summarise(arms[1])
        ratios = {
            "cpu_per_request": on["cpu_ms_per_request"] / off["cpu_ms_per_request"],
            **{f"{n}_{q}": on[n][q] / off[n][q] for n in ("recommend", "events") for q in ("p50_ms", "p99_ms")},
        }
        counts = {}
        for arm in arms:
            with __import__("urllib.request").request.urlopen(arm.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
            counts[f"{arm.sample:g}"] = {
                line.split(" ")[0]: float(line.split(" ")[-1])
                for line in text.splitlines()
                if line.startswith(("hytrec_online_impressions_total", "hytrec_online_events_total"))
                and not line.endswith(" 0.0")
            }
        result = {
            "rate": rate,
            "duration_s": duration,
            "rounds": rounds,
            "n_items": n_items,
            "sampled": on,
            "unsampled": off,
            "ratio_sampled_over_unsampled": ratios,
            "online_counters": counts,
            "in_process_us": micro,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        text = json.dumps(result, indent=2)
        typer.echo(text)
        if json_out is not None:
            json_out.write_text(text + "\n")
    finally:
        for arm in arms:
            arm.stop()
