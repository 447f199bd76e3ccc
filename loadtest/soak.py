"""``hytrec soak``: mixed open-loop load for minutes, with the server's and Redis's memory sampled throughout.

The load is the open-loop generator of ``hytrec loadtest`` (engine.py), run in consecutive windows so errors
and latency are seen over time; a thread samples, every ``--sample-s`` seconds, the RSS of the server's
process tree (supervisor, workers, watchdog) and Redis's ``used_memory`` (with its RSS and key count).
Growth is measured from the end of the warm-up to the end of the run (median of three samples at each end,
so one allocation burst does not decide it). The command exits 1 when a growth is beyond its bound or any
request failed (not 2xx, a timeout, a connection error or a drop), 2 on a usage error.

Without ``--url`` it starts its own ``hytrec serve`` (the demo model unless ``--model``, an embedded Redis in
a temporary data directory) and stops it at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer


def _opt(*names: str, **kw: Any) -> Any:
    return typer.Option(*names, **kw)


@dataclass
class Target:
    """What is loaded and sampled: the base URL, the server's pid, a Redis client."""

    url: str
    pid: int
    redis: Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _own_server(model: Path | None, workers: int) -> Iterator[Target]:
    """A `hytrec serve` of the soak's own, on a free loopback port with an embedded Redis; stopped at the end."""
    import httpx
    import redis

    from hytrec.state_store.embedded import registry

    data = Path(tempfile.mkdtemp(prefix="hytrec-soak-"))
    port = _free_port()
    env = {**os.environ, "HYTREC_HOST": "127.0.0.1", "HYTREC_PORT": str(port), "HYTREC_DATA_DIR": str(data)}
    env.update({"HYTREC_WORKERS": str(workers), "HYTREC_LOG_LEVEL": "warning"})
    env.pop("HYTREC_REDIS_URL", None)
    if model is not None:
        env["HYTREC_MODEL"] = str(model)
    log = open(data / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "hytrec.cli", "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    client = None
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hytrec serve exited with {proc.returncode}: {(data / 'serve.log').read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("hytrec serve did not become ready in 120 s")
            time.sleep(0.2)
        reg = registry(data)
        if reg is None:
            raise RuntimeError("the embedded Redis left no registry")
        client = redis.Redis(unix_socket_path=reg["unixsocket"], socket_timeout=5)
        yield Target(url, proc.pid, client)
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        import shutil

        shutil.rmtree(data, ignore_errors=True)


def _tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, bytes (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class Sampler(threading.Thread):
    """Samples server RSS and Redis memory every ``every`` seconds until stopped."""

    def __init__(self, target: Target, every: float) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.target, self.every = target, every
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        row: dict[str, Any] = {
            "t_s": round(time.monotonic() - self.t0, 2),
            "server_rss_mb": _tree_rss(self.target.pid) / 2**20,
        }
        try:
            info = self.target.redis.info("memory")
            row["redis_used_memory_mb"] = info["used_memory"] / 2**20
            row["redis_rss_mb"] = info["used_memory_rss"] / 2**20
            row["redis_keys"] = self.target.redis.dbsize()
        except Exception as exc:  # noqa: BLE001 - a failed sample is reported, not fatal
            self.errors.append(f"t={row['t_s']}: {exc!r}")
        self.samples.append(row)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.sample()  # the final state


_PROBES = ("/readyz", "/healthz")


def server_counters(url: str, api_key: str | None) -> dict[str, dict[str, float]] | str:
    """The server's own counts at the end of the run, to say what its non-2xx answers were: requests answered
    5xx by route (``<unmatched>``: shed at admission, before routing), method and status (not the probes' 503s
    while it started), shed requests by path and reason (``overloaded``), events by outcome.
    A string (the error) if /metrics could not be read."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).raise_for_status().text
    except httpx.HTTPError as exc:
        return f"{exc!r}"
    out: dict[str, dict[str, float]] = {"http_5xx": {}, "shed": {}, "events": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            lab = sample.labels
            route, status = lab.get("route", ""), lab.get("status", "")
            if sample.name == "hytrec_http_request_seconds_count" and route not in _PROBES and status[:1] == "5":
                key = f"{lab.get('method')} {route} {status}"
                out["http_5xx"][key] = out["http_5xx"].get(key, 0) + sample.value
            elif sample.name == "hytrec_shed_total" and sample.value:
                out["shed"][f"{lab.get('path')}/{lab.get('reason')}"] = sample.value
            elif sample.name == "hytrec_events_total" and sample.value:
                out["events"][lab.get("outcome", "")] = sample.value
    return out


def growth(samples: list[dict[str, Any]], key: str, after_s: float) -> dict[str, float] | None:
    """Median of the first three samples at or after ``after_s`` against the median of the last three."""
    rows = [s for s in samples if key in s]
    base = [s[key] for s in rows if s["t_s"] >= after_s][:3]
    end = [s[key] for s in rows][-3:]
    if not base or not end:
        return None
    b, e = statistics.median(base), statistics.median(end)
    return {"after_warmup_mb": round(b, 2), "end_mb": round(e, 2), "growth_mb": round(e - b, 2)}


def soak(
    minutes: Annotated[float, _opt("--minutes", help="Length of the run.")] = 10.0,
    url: Annotated[
        str | None, _opt("--url", help="Load this running server (then give --pid and --redis-url); default: own.")
    ] = None,
    pid: Annotated[int | None, _opt("--pid", help="Pid of the server behind --url (its tree's RSS is sampled).")] = (
        None
    ),
    redis_url: Annotated[
        str | None, _opt("--redis-url", envvar="HYTREC_REDIS_URL", help="Redis of the server behind --url.")
    ] = None,
    model: Annotated[Path | None, _opt("--model", help="Checkpoint of the own server (default: the demo).")] = None,
    workers: Annotated[int, _opt("--workers", help="Workers of the own server.")] = 1,
    rate: Annotated[float, _opt("--rate", help="Offered load, req/s (Poisson); keep it below capacity.")] = 30.0,
    mix: Annotated[str, _opt("--mix", help="Endpoint shares.")] = "recommend=0.7,events=0.3",
    users: Annotated[int, _opt("--users", help="Distinct users, drawn Zipf.")] = 1000,
    events_per_post: Annotated[int, _opt("--events-per-post", help="Events in one POST /v1/events.")] = 5,
    window_s: Annotated[float, _opt("--window-s", help="Seconds of load per reported window.")] = 30.0,
    sample_s: Annotated[float, _opt("--sample-s", help="Seconds between memory samples.")] = 5.0,
    warmup_s: Annotated[float, _opt("--warmup-s", help="Growth is measured from this many seconds in.")] = 60.0,
    max_rss_growth_mb: Annotated[
        float, _opt("--max-rss-growth-mb", help="Bound on the server tree's RSS growth after the warm-up.")
    ] = 64.0,
    max_redis_growth_mb: Annotated[
        float, _opt("--max-redis-growth-mb", help="Bound on Redis used_memory growth after the warm-up.")
    ] = 32.0,
    max_errors: Annotated[int, _opt("--max-errors", help="Failed requests allowed (not 2xx, timeout, drop).")] = 0,
    api_key: Annotated[str | None, _opt("--api-key", envvar="HYTREC_API_KEY", help="Bearer key.")] = None,
    json_out: Annotated[Path | None, _opt("--json-out", help="Also write the report here.")] = None,
) -> None:
    """Soak: mixed open-loop load for --minutes with server RSS and Redis memory sampled; JSON report on stdout.

    Exits 1 if memory grew beyond a bound after the warm-up or a request failed, else 0.
    """
    try:
        from hytrec.loadtest import engine, report
        from hytrec.loadtest.wire import Target as WireTarget
        from hytrec.loadtest.workload import Workload, fetch_items, parse_mix
    except ImportError as exc:
        typer.echo(f"error: {exc}; install with `pip install 'hytrec[train]'`", err=True)
        raise typer.Exit(2) from exc

    if minutes <= 0 or rate <= 0 or window_s <= 0 or sample_s <= 0:
        typer.echo("error: --minutes, --rate, --window-s and --sample-s must be positive", err=True)
        raise typer.Exit(2)
    if url is not None and (pid is None or redis_url is None):
        typer.echo("error: with --url, give --pid and --redis-url too (what to sample)", err=True)
        raise typer.Exit(2)
    try:
        shares = parse_mix(mix)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    with contextlib.ExitStack() as stack:
        if url is None:
            target = stack.enter_context(_own_server(model, workers))
        else:
            import redis

            target = Target(url, pid or 0, stack.enter_context(redis.Redis.from_url(redis_url or "")))
        workload = Workload(shares, users, 1.1, 10, events_per_post, 1, user_prefix="soak-", api_key=api_key)
        if "events" in shares:
            with engine.event_loop_runner() as runner:
                ids, pops = runner.run(fetch_items(WireTarget(target.url), api_key))
            workload.items, workload.item_weights = ids, [p + 1.0 for p in pops]
        workload.check()
        sampler = Sampler(target, sample_s)
        sampler.start()
        windows = []
        total_s = minutes * 60
        typer.echo(f"soak: {rate:g} req/s on {target.url} for {total_s:g} s", err=True)
        try:
            with engine.Generators(1) as gens:
                done, i = 0.0, 0
                while done < total_s - 1e-9:
                    length = min(window_s, total_s - done)
                    plan = engine.Plan(target.url, workload, rate, length, 0.0, 5.0, seed=i)
                    run = report.merge_run(gens.run(plan, i), rate, shares, length, 5.0)
                    e = run["endpoints"].get("all") or next(iter(run["endpoints"].values()))
                    ok = sum(v for k, v in e["status"].items() if k.startswith("2"))
                    failed = e["scheduled"] - ok
                    windows.append(
                        {
                            "from_s": round(done, 1),
                            "seconds": round(length, 1),
                            "scheduled": e["scheduled"],
                            "status": e["status"],
                            "timeouts": e["timeouts"],
                            "conn_errors": e["conn_errors"],
                            "dropped": e["dropped"],
                            "failed": failed,
                            "latency_ms": e["latency_ms"],
                        }
                    )
                    typer.echo(
                        f"  {done + length:5.0f} s: {e['status']} p99 {e['latency_ms']['p99']} ms, server RSS "
                        f"{sampler.samples[-1]['server_rss_mb']:.1f} MB",
                        err=True,
                    )
                    done += length
                    i += 1
        finally:
            sampler.stop()
        counters = server_counters(target.url, api_key)  # while the server still runs

    warm = min(warmup_s, total_s / 3)
    rss = growth(sampler.samples, "server_rss_mb", warm)
    red = growth(sampler.samples, "redis_used_memory_mb", warm)
    failed = sum(w["failed"] for w in windows)
    verdicts = {
        "server_rss": rss is not None and rss["growth_mb"] <= max_rss_growth_mb,
        "redis_used_memory": red is not None and red["growth_mb"] <= max_redis_growth_mb,
        "errors": failed <= max_errors,
    }
    out = {
        "tool": "hytrec soak",
        "config": {
            "minutes": minutes,
            "rate_rps": rate,
            "mix": shares,
            "users": users,
            "events_per_post": events_per_post,
            "workers": workers if url is None else None,
            "warmup_s": warm,
            "sample_s": sample_s,
        },
        "bounds": {"max_rss_growth_mb": max_rss_growth_mb, "max_redis_growth_mb": max_redis_growth_mb},
        "requests": sum(w["scheduled"] for w in windows),
        "failed": failed,
        "growth": {"server_rss": rss, "redis_used_memory": red},
        "server_counters": counters,
        "pass": verdicts,
        "windows": windows,
        "samples": [{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()} for s in sampler.samples],
        "sample_errors": sampler.errors,
    }
    text = json.dumps(out, indent=1)
    typer.echo(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    if not all(verdicts.values()):
        typer.echo(f"soak: beyond a bound: {[k for k, v in verdicts.items() if not v]}", err=True)
        raise typer.Exit(1)
