"""The rules and the dashboard against a real Prometheus scraping a real `hytrec serve` and `hytrec consume`.

promtool checks and unit-tests the committed rules; then a Prometheus started here (free loopback port, 1 s
scrape and evaluation) scrapes a 2-worker service under traffic and a stream consumer fed by the producer, runs
every query parsed out of deploy/grafana/hytrec.json and deploy/prometheus/rules.yml, and must get series back
for each; then the service's Redis is stopped and the Redis-error and readiness alerts must be seen firing
through the Prometheus API, and a killed consumer fires HyTRecDown for its job. The rules for the live run are
rendered by hytrec/ops.py with ``hold="0s"`` (the same expressions, no waiting ``for:``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hytrec import ops
from tests.redis_servers import RedisServer, free_port
from tests.service_fixtures import Checkpoint, ServiceProcess, service_env
from tests.test_deploy import REPO, require_tool

RULES = REPO / ops.RULES
RULES_TEST = REPO / "deploy/prometheus/rules_test.yml"
DASHBOARD = REPO / ops.DASHBOARD
COMPARISON = re.compile(r"^(?P<query>.*\S)\s*(?:>|<|==|!=|>=|<=)\s*[0-9.e+-]+\s*$", re.DOTALL)


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules(groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in groups["groups"] for r in g["rules"] if "alert" in r]


def dashboard_queries(node: Any) -> list[str]:
    """Every ``expr`` of every panel target, wherever it sits in the JSON model."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for v in node.values() for q in dashboard_queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in dashboard_queries(v)]
    return []


def committed_queries() -> dict[str, str]:
    """Name -> PromQL of each dashboard query, recording rule and alert (its condition without the threshold,
    which holds or not by design; the threshold's logic is what the promtool unit tests cover)."""
    queries = {}
    for i, expr in enumerate(dashboard_queries(json.loads(DASHBOARD.read_text()))):
        # as Grafana sends it with the job and instance variables at "All" (their all value, .*)
        for var, value in (("$__rate_interval", "1m"), ("$job", ".*"), ("$instance", ".*")):
            expr = expr.replace(var, value)
        queries[f"dashboard[{i}]"] = expr
    groups = yaml.safe_load(RULES.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                queries[rule["record"]] = rule["expr"]
            else:
                match = COMPARISON.match(rule["expr"])
                assert match, f"alert {rule['alert']} does not end with a threshold: {rule['expr']}"
                queries[rule["alert"]] = match["query"]
    return queries


# ------------------------------------------------------------------------------------------- promtool
def test_promtool_checks_the_rules() -> None:
    promtool = require_tool("promtool")
    res = _run(promtool, "check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    res = _run(promtool, "test", "rules", str(RULES_TEST))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    cases = [case for group in tests for case in group.get("alert_rule_test", [])]
    for rule in alert_rules(yaml.safe_load(RULES.read_text())):
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it stays silent"


def test_the_slo_setting_is_what_the_rules_compare_with(tmp_path: Path) -> None:
    """Rendered with a 150 ms objective, the ~100 ms p99 of the unit test no longer fires: the tests bite."""
    promtool = require_tool("promtool")
    (tmp_path / "rules.yml").write_text(ops.dump_yaml(ops.rule_groups(slo_p99_ms=150)))
    (tmp_path / "rules_test.yml").write_text(RULES_TEST.read_text())
    res = _run(promtool, "test", "rules", "rules_test.yml", cwd=tmp_path)
    assert res.returncode != 0
    assert "HyTRecLatencyP99AboveSLO" in res.stdout + res.stderr
    assert "0.15" in ops.dump_yaml(ops.rule_groups(slo_p99_ms=150))


def test_compose_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    res = _run(promtool, "check", "config", str(REPO / "deploy/prometheus/prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_prometheusrule_spec_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    resource = yaml.safe_load((REPO / ops.PROMETHEUS_RULE).read_text())
    assert resource["spec"] == yaml.safe_load(RULES.read_text())
    (tmp_path / "spec.yml").write_text(yaml.safe_dump(resource["spec"]))
    res = _run(promtool, "check", "rules", str(tmp_path / "spec.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------------- live Prometheus
@dataclass
class Stack:
    redis: RedisServer
    service: ServiceProcess
    consumer: subprocess.Popen
    consumer_env: dict[str, str]
    prometheus: subprocess.Popen
    prom_url: str
    workdir: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        res = httpx.get(f"{self.prom_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = res.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def firing(self) -> set[str]:
        alerts = httpx.get(f"{self.prom_url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def post(client: httpx.Client, events: list[dict[str, Any]]) -> httpx.Response:
    """POST /v1/events, retried after a 503 (a loaded machine can time a request out; event ids make it safe)."""
    for _ in range(5):
        res = client.post("/v1/events", json={"events": events})
        if res.status_code != 503:
            break
        time.sleep(float(res.headers.get("retry-after", 1)))
    assert res.status_code == 200, res.text
    return res


def traffic(url: str, items: list[str], rounds: int = 3) -> None:
    """A little of everything the queries read: events (applied, duplicate, unknown item, out of order),
    recommendations with and without state, user summaries, readiness probes."""
    with httpx.Client(base_url=url, timeout=10) as client:
        for r in range(rounds):
            events = [
                {
                    "user_id": f"u{u}",
                    "item_id": items[(u * 7 + r) % len(items)],
                    "ts": 1000.0 + r,
                    "event_id": f"e{u}-{r}",
                }
                for u in range(8)
            ]
            events.append({"user_id": "u0", "item_id": "no-such-item", "ts": 1000.5 + r, "event_id": f"x-{r}"})
            events.append({"user_id": "u1", "item_id": items[0], "ts": 10.0, "event_id": f"late-{r}"})
            assert post(client, events).status_code == 200
            assert post(client, events[:2]).status_code == 200  # duplicates
            for u in range(10):
                assert client.get(f"/v1/users/u{u}/recommendations", params={"k": 5}).status_code == 200
            assert client.get("/v1/users/u0").status_code == 200
            client.get("/readyz")
            time.sleep(1.0)


def stream_traffic(env: dict[str, str], items: list[str]) -> None:
    """Events for the consumer through the producer, under the consumer's prefix and stream."""
    from hytrec.service.settings import Settings
    from hytrec.streams.producer import StreamProducer

    settings = Settings(**{k.removeprefix("HYTREC_").lower(): v for k, v in env.items() if k.startswith("HYTREC_")})
    with StreamProducer.from_settings(settings) as producer:
        producer.add(
            {"user_id": f"s{u}", "item_id": items[u % len(items)], "ts": 2000.0 + u, "event_id": f"s-{u}"}
            for u in range(20)
        )


def wait_for(check: Any, timeout: float, what: str) -> None:
    """Poll ``check()`` until it returns True; anything else it returns is the state shown on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(1.0)
    raise AssertionError(f"{what} within {timeout}s; last: {last}")


@pytest.fixture(scope="module")
def stack(service_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus")
    work = tmp_path_factory.mktemp("prom")
    redis = RedisServer().start()  # this module's own: the test stops it
    # two workers, as deployed: the multiprocess metrics (PROMETHEUS_MULTIPROC_DIR) are what Prometheus reads
    service = ServiceProcess(service_env(service_checkpoint, redis.url, workers=2), work)
    # `hytrec consume` beside it, on its own metrics port (HYTREC_CONSUME_METRICS_PORT), as deployed
    metrics_port = free_port()
    consumer_env = service_env(service_checkpoint, redis.url, consume_metrics_port=metrics_port, stream_lease_ms=1500)
    consumer_log = open(work / "consumer.log", "wb")  # noqa: SIM115 - closed below
    prom = consumer = None
    try:
        service.start()
        consumer = subprocess.Popen(
            [sys.executable, "-m", "hytrec.cli", "consume"],
            cwd=REPO,
            env={**os.environ, **consumer_env, "PYTHONPATH": str(REPO), "HYTREC_LOG_LEVEL": "warning"},
            stdout=consumer_log,
            stderr=subprocess.STDOUT,
        )
        (work / "rules.yml").write_text(ops.dump_yaml(ops.rule_groups(hold="0s")))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {"job_name": ops.JOB, "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}]},
                {"job_name": ops.CONSUMER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed below
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if prom.poll() is not None:
                raise RuntimeError((work / "prometheus.log").read_text()[-3000:])
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, "prometheus ready")
        yield Stack(redis, service, consumer, consumer_env, prom, url, work)
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(20)
            log.close()
        if consumer is not None:
            consumer.terminate()
            try:
                consumer.wait(20)
            except subprocess.TimeoutExpired:
                consumer.kill()
                consumer.wait(5)
        consumer_log.close()
        service.stop()
        redis.stop()


def test_every_dashboard_and_rule_query_returns_series(stack: Stack, service_checkpoint: Checkpoint) -> None:
    stream_traffic(stack.consumer_env, service_checkpoint.item_ids)
    traffic(stack.service.url, service_checkpoint.item_ids)
    queries = committed_queries()
    assert len(queries) > 20
    assert [q for q in queries.values() if "hytrec_stream_" in q], "the consumer's queries are among them"

    def empty() -> list[str] | bool:
        assert stack.consumer.poll() is None, (stack.workdir / "consumer.log").read_text()[-3000:]
        missing = [name for name, expr in queries.items() if not stack.query(expr)]
        return missing or True

    wait_for(empty, 45, "every query returns series (the names of those without)")
    # pre-initialised label sets are real series, not an `or` fallback
    outcomes = {s["metric"]["outcome"] for s in stack.query("hytrec_events_total")}
    assert {"applied", "duplicate", "unknown_item", "out_of_order"} <= outcomes
    assert stack.query('hytrec_events_total{outcome="duplicate"} > 0'), "the traffic posted duplicates"
    # the consumer applied the stream's events; no dead letter yet, and its series is there at 0 all the same
    consumer = f'job="{ops.CONSUMER_JOB}"'
    assert stack.query(f'hytrec_stream_entries_total{{{consumer}, outcome="applied"}} >= 20')
    assert stack.query(f'hytrec_stream_entries_total{{{consumer}, outcome="dead_letter"}} == 0')
    assert stack.query(f"hytrec_stream_leases_held{{{consumer}}} == 1")


def test_stopping_redis_makes_the_redis_and_readiness_alerts_fire(stack: Stack) -> None:
    assert not {"HyTRecRedisErrors", "HyTRecNotReady"} & stack.firing()
    stack.redis.kill()
    with httpx.Client(base_url=stack.service.url, timeout=10) as client:

        def fired() -> set[str] | bool:
            assert client.get("/v1/users/u0/recommendations").status_code == 503
            assert client.get("/readyz").status_code == 503
            now = stack.firing()
            return {"HyTRecRedisErrors", "HyTRecNotReady"} <= now or now

        wait_for(fired, 60, "HyTRecRedisErrors and HyTRecNotReady firing")
    errors = stack.query("sum(hytrec_store_redis_errors_total)")
    assert float(errors[0]["value"][1]) > 0


def test_a_killed_consumer_makes_the_down_alert_fire_for_its_job(stack: Stack) -> None:
    def down_jobs() -> set[str]:
        alerts = httpx.get(f"{stack.prom_url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return {
            a["labels"]["job"] for a in alerts if a["labels"]["alertname"] == "HyTRecDown" and a["state"] == "firing"
        }

    assert ops.CONSUMER_JOB not in down_jobs()
    stack.consumer.kill()
    stack.consumer.wait(10)
    wait_for(lambda: ops.CONSUMER_JOB in down_jobs() or down_jobs(), 30, "HyTRecDown firing for the consumer's job")
