"""The open-loop load tester: its schedule, that latency runs from the scheduled send (so queues show), that
every request is accounted for, exact histogram merging, the workload draws, and a short run on the real app.

Servers are the tool's own trivial endpoint (in this process, or in its own process) and one `hytrec serve`;
every run is a second or less on 127.0.0.1.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from hytrec.loadtest import report
from hytrec.loadtest.commands import calibration_ceiling, loadtest
from hytrec.loadtest.engine import Generators, Plan, event_loop_runner, new_hist, process_seed, record, run_plan
from hytrec.loadtest.hello import Behaviour, HelloProcess, start
from hytrec.loadtest.wire import Pool, Target, _dechunk, get_json
from hytrec.loadtest.workload import Workload, fetch_items, parse_mix, poisson_arrivals, zipf
from tests.redis_servers import free_port
from tests.service_fixtures import API_KEY, ServiceProcess, service  # noqa: F401 - fixture

HELLO = {"hello": 1.0}


def run_against(behaviour: Behaviour, **plan: Any) -> dict[str, Any]:
    """One plan (one process) against the trivial endpoint served from this same event loop; merged report."""

    async def main() -> dict[str, Any]:
        server = await start(behaviour)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run_plan(Plan(url=f"http://127.0.0.1:{port}", workload=Workload(HELLO), **plan))
        finally:
            server.close()

    with event_loop_runner() as runner:
        result = runner.run(main())
    out = report.merge_run([result], plan["rate"], HELLO, plan["duration"], plan.get("timeout", 5.0))
    assert out["endpoints"]["hello"]["unaccounted"] == 0  # every scheduled request ended one way or another
    return out


def test_schedule_is_poisson_with_the_mean_rate() -> None:
    rate, horizon = 200.0, 60.0
    arrivals = poisson_arrivals(random.Random(3), rate, horizon, 10**6)
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert abs(len(arrivals) / horizon - rate) < 0.03 * rate
    assert abs(statistics.fmean(gaps) - 1 / rate) < 0.03 / rate
    assert abs(statistics.stdev(gaps) / statistics.fmean(gaps) - 1) < 0.05  # exponential: CV 1
    per_second = Counter(int(t) for t in arrivals)
    counts = [per_second[s] for s in range(int(horizon))]
    assert 0.6 < statistics.variance(counts) / statistics.fmean(counts) < 1.5  # Poisson counts: variance = mean
    assert arrivals == sorted(arrivals) and arrivals[-1] < horizon
    assert len(poisson_arrivals(random.Random(3), rate, horizon, 100)) == 100  # the request cap


def test_latency_runs_from_the_scheduled_time_so_the_server_queue_shows() -> None:
    """40 req/s offered to a server that serves one request at a time in 50 ms (20 req/s): each request waits
    behind the earlier ones. A closed-loop tool would report ~50 ms; from the schedule, latencies grow with the
    queue, as the same arrivals replayed through that queue predict."""
    plan = {"rate": 40.0, "duration": 1.0, "timeout": 5.0, "max_in_flight": 256, "seed": 11}
    out = run_against(Behaviour(delay_s=0.05, serial=True), **plan)
    e = out["endpoints"]["hello"]
    assert e["scheduled"] == e["sent"] == e["answered"] > 20 and e["status"] == {"200": e["answered"]}
    done, expected = 0.0, []  # the queue: each answer 50 ms after the later of its arrival and the previous answer
    for t in poisson_arrivals(random.Random(plan["seed"]), plan["rate"], plan["duration"], 10**6):
        done = max(done, t) + 0.05
        expected.append((done - t) * 1000)
    lat = e["latency_ms"]
    assert lat["p50"] == pytest.approx(statistics.median(expected), rel=0.15, abs=30)
    assert lat["max"] == pytest.approx(max(expected), rel=0.15, abs=30)
    assert lat["max"] > 300 and lat["p50"] > 3 * 50
    assert out["generator_lag_ms"]["p99"] < 50  # sent on time: the wait is the server's queue


def test_requests_over_the_in_flight_cap_are_counted_as_dropped() -> None:
    """max-in-flight 1 against a 50 ms server at 60 req/s: arrivals while one is outstanding are not sent, and
    are reported as dropped by the generator (scheduled = answered + dropped)."""
    out = run_against(Behaviour(delay_s=0.05), rate=60.0, duration=1.0, max_in_flight=1, seed=5)
    e = out["endpoints"]["hello"]
    assert e["dropped"] > 0 and e["scheduled"] == e["answered"] + e["dropped"] == e["sent"] + e["dropped"]
    assert e["latency_ms"]["count"] == e["answered"] and not out["keeps_up"]


def test_5xx_timeouts_and_connection_errors_are_counted_not_dropped() -> None:
    errors = run_against(Behaviour(status=503), rate=100.0, duration=0.5, seed=1)["endpoints"]["hello"]
    assert errors["answered"] == errors["scheduled"] > 20 and errors["status"] == {"503": errors["scheduled"]}
    assert errors["latency_ms"]["count"] == errors["scheduled"] and errors["latency_2xx_ms"]["count"] == 0

    slow = run_against(Behaviour(delay_s=0.5), rate=100.0, duration=0.5, timeout=0.1, seed=2)
    t = slow["endpoints"]["hello"]
    assert t["timeouts"] == t["scheduled"] > 20 and t["answered"] == 0 and t["status"] == {}
    assert t["latency_ms"]["count"] == t["timeouts"]  # at latency = timeout, so they weigh on the percentiles
    assert t["latency_ms"]["p50"] == pytest.approx(100, rel=0.01) and t["latency_2xx_ms"]["count"] == 0

    async def refused() -> dict[str, Any]:
        return await run_plan(Plan(f"http://127.0.0.1:{free_port()}", Workload(HELLO), rate=100.0, duration=0.3))

    with event_loop_runner() as runner:
        c = report.merge_run([runner.run(refused())], 100.0, HELLO, 0.3, 5.0)["endpoints"]["hello"]
    assert c["conn_errors"] == c["scheduled"] > 5 and c["answered"] == c["timeouts"] == 0


def test_histograms_merge_exactly_across_processes() -> None:
    rng = random.Random(0)
    values = [rng.lognormvariate(-6, 1.5) for _ in range(20_000)]  # seconds, 10 us .. seconds
    whole, parts = new_hist(), [new_hist() for _ in range(3)]
    for i, v in enumerate(values):
        record(whole, v)
        record(parts[i % 3], v)
    stats = {"scheduled": 1, "sent": 1, "dropped": 0, "answered": 1, "timeouts": 0, "conn_errors": 0}
    encoded = [
        {**stats, "status": {"200": 1}, "last_send": 0, "last_answer": 0, "hist": h.encode().decode(), "hist_ok": ""}
        for h in parts
    ]
    for e in encoded:
        e["hist_ok"] = e["hist"]
    merged = report.merge_endpoint(encoded)["hist"]
    assert merged.get_total_count() == len(values)
    assert list(merged.counts) == list(whole.counts)
    for q in (50, 99, 99.9, 100):
        assert merged.get_value_at_percentile(q) == whole.get_value_at_percentile(q)


def test_processes_split_the_rate_and_their_stats_add_up() -> None:
    with HelloProcess() as hello, Generators(2) as gens:
        plan = Plan(hello.url, Workload(HELLO), rate=200.0, duration=0.5, seed=4)
        results = gens.run(plan)
    parts = [r["endpoints"]["hello"] for r in results]
    assert len(parts) == 2 and all(40 < p["scheduled"] < 100 for p in parts)  # 100 req/s each
    assert parts[0]["hist"] != parts[1]["hist"]  # own seeds, own streams
    run = report.merge_run(results, 200.0, HELLO, 0.5, 5.0)
    e = run["endpoints"]["hello"]
    assert e["answered"] == sum(p["answered"] for p in parts) == e["latency_ms"]["count"] == e["scheduled"]
    assert process_seed(0, 0, 0) != process_seed(0, 0, 1) != process_seed(0, 1, 0)


def test_zipf_covers_the_users_with_the_right_skew() -> None:
    n, s, draws = 50, 1.1, 200_000
    sample = zipf(n, s)
    rng = random.Random(1)
    counts = Counter(sample(rng) for _ in range(draws))
    assert set(counts) == set(range(n))  # every user is drawn
    norm = sum(1 / (r + 1) ** s for r in range(n))
    for r in range(n):
        assert abs(counts[r] / draws - 1 / (r + 1) ** s / norm) < 0.005
    assert counts[0] / counts[1] == pytest.approx(2**s, rel=0.05)


def test_mix_parsing() -> None:
    assert parse_mix("recommend=0.8,events=0.2") == {"recommend": 0.8, "events": 0.2}
    assert parse_mix("recommend=3, events=1") == {"recommend": 0.75, "events": 0.25}
    with pytest.raises(ValueError):
        parse_mix("recommend=1,nosuch=1")


def test_chunked_answers_are_framed() -> None:
    body = bytearray(b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\n\r\nNEXT")
    assert _dechunk(body, 0) == (b"Wikipedia ", len(body) - 4)
    assert _dechunk(bytearray(b"4\r\nWi"), 0) is None


def test_calibration_ceiling_is_the_last_rate_before_the_first_failure() -> None:
    def run(rate: float, ok: bool, p99: float) -> dict[str, Any]:
        return {
            "offered_rps": rate,
            "keeps_up": ok,
            "endpoints": {"hello": {"answer_rps": rate, "latency_ms": {"p99": p99}}},
        }

    runs = [run(100, True, 1), run(200, True, 2), run(400, True, 50), run(800, True, 2)]
    assert calibration_ceiling(runs, 10)[0] == 200  # 400 fails on p99, so 800 does not count
    assert calibration_ceiling([run(100, False, 1)], 10)[0] is None


def test_calibrate_reports_a_ceiling_and_load_warns_above_a_third_of_it(tmp_path: Path) -> None:
    cli = CliRunner()
    app = _app()
    out = tmp_path / "cal.json"
    args = ["--calibrate", "--sweep", "100,200", "--duration", "0.5", "--warmup", "0", "--calibrate-p99-ms", "500"]
    res = cli.invoke(app, [*args, "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    cal = json.loads(out.read_text())["calibration"]
    assert cal["ceiling_rps"] == 200 and "generator ceiling: 200 req/s" in res.output
    with HelloProcess() as hello:
        res = cli.invoke(
            app, ["--url", hello.url, "--mix", "hello=1", "--rate", "50", "--duration", "0.3", "--ceiling", "90"]
        )
    assert res.exit_code == 0, res.output
    assert "above a third of the generator's calibrated ceiling" in res.output
    refused = cli.invoke(app, ["--url", "http://192.0.2.1:8000", "--mix", "hello=1", "--duration", "0.1"])
    assert refused.exit_code == 2 and "not a loopback address" in refused.output  # checked before any connection


def test_table_and_plot(tmp_path: Path) -> None:
    def fake(lat: float) -> dict[str, Any]:
        h = new_hist()
        for i in range(100):
            record(h, lat * (1 + i / 100))
        e = {"scheduled": 100, "sent": 100, "dropped": 0, "answered": 100, "timeouts": 0, "conn_errors": 0}
        e |= {"status": {"200": 100}, "last_send": 1.0, "last_answer": 1.0}
        e |= {"hist": h.encode().decode(), "hist_ok": h.encode().decode()}
        return {"endpoints": {"recommend": e, "events": dict(e)}, "lag": h.encode().decode(), "connections": 2}

    mix = {"recommend": 0.8, "events": 0.2}
    runs = [report.merge_run([fake(r / 1e4)], r, mix, 1.0, 5.0) for r in (25, 50, 100)]
    text = report.table(runs)
    assert text.count("recommend") == 3 and "200:100" in text
    report.plot(runs, tmp_path / "lat.png", "test", (60, "generator ceiling / 3"))
    assert (tmp_path / "lat.png").read_bytes()[:4] == b"\x89PNG"


def test_items_from_the_paged_catalogue_and_a_short_mixed_run_on_the_real_app(
    service: ServiceProcess,  # noqa: F811
    service_checkpoint,
    tmp_path: Path,
) -> None:
    target = Target(service.url)
    with event_loop_runner() as runner:
        ids, pops = runner.run(fetch_items(target, API_KEY, page_size=64))
        model = runner.run(_get(target, "/v1/model"))
    assert ids == service_checkpoint.item_ids and len(pops) == len(ids) and model["n_items"] == len(ids)
    out = tmp_path / "run.json"
    args = ["--url", service.url, "--api-key", API_KEY, "--rate", "40", "--duration", "1", "--warmup", "0.2"]
    args += ["--mix", "recommend=0.5,events=0.5", "--users", "20", "--events-per-post", "3", "--users-per-post", "2"]
    res = CliRunner().invoke(_app(), [*args, "--items-page-size", "100", "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    run = json.loads(out.read_text())["runs"][0]["endpoints"]
    for name in ("recommend", "events"):
        e = run[name]
        assert e["scheduled"] > 5 and e["answered"] == e["scheduled"] and e["status"] == {"200": e["scheduled"]}
    user = httpx.get(f"{service.url}/v1/users/load-0", headers={"Authorization": f"Bearer {API_KEY}"})
    assert user.status_code == 200 and user.json()["history_length"] > 0  # the hottest Zipf user got events


async def _get(target: Target, path: str) -> Any:
    pool = Pool(target)
    try:
        return await get_json(pool, path, API_KEY)
    finally:
        pool.close()


def _app() -> Any:
    import typer

    app = typer.Typer()
    app.command()(loadtest)
    return app
