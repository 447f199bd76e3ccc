"""Schemathesis against a real `hytrec serve` over the service's own /openapi.json, every check on.

Every route is generated for (examples, coverage, fuzzing and stateful phases; ``--checks all``: no 5xx, every
status documented, every response matching its schema and content type, errors as problem documents,
negative data rejected, positive data accepted, 405 with Allow, auth not ignored). Positive event bodies carry
item ids of the served catalogue (tests/fuzz_hooks.py), and every answer is logged, so the case counts below
are counted, not read from the summary. Run once with the routes open and once with API keys and a rate
limit (high enough not to be reached: the 429 is documented, the limiter's round trip is on every request).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.service_fixtures import REPO, Checkpoint, ServiceProcess, service_env

KEY = "fuzz-key-0123456789"
MAX_EXAMPLES = 60
# POST /v1/events gets more cases, fuzzed positively (its negative cases come from the coverage phase):
# most of its cases reach a 200, as a client's would.
CONFIG = """
[[operations]]
include-operation-id = "post_events"
phases.fuzzing.generation.mode = "positive"
phases.fuzzing.generation.max-examples = 120
"""


@pytest.fixture(scope="module", params=["open", "keys"])
def fuzzed(
    request: pytest.FixtureRequest,
    service_checkpoint: Checkpoint,
    redis_standalone_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, collections.Counter], int, str]]:
    """A server, then one schemathesis run against it: (mode, counts per operation, exit code, output)."""
    extra: dict[str, object] = {}
    if request.param == "keys":
        extra.update(api_keys=f"{KEY},reader-only:read", rate_limit_per_s=100_000, rate_limit_burst=100_000)
    work = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    server = ServiceProcess(service_env(service_checkpoint, redis_standalone_url, **extra), work).start()
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        page = httpx.get(f"{server.url}/v1/items", params={"limit": 10_000}, headers=headers, timeout=10).json()
        (work / "items.txt").write_text("\n".join(i["item_id"] for i in page["items"]))
        (work / "schemathesis.toml").write_text(CONFIG)
        log = work / "answers.jsonl"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
            "HYTREC_FUZZ_ITEM_IDS": str(work / "items.txt"),
            "HYTREC_FUZZ_LOG": str(log),
        }
        cli = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(work / "schemathesis.toml"), "run"]
        cli += [f"{server.url}/openapi.json", "--checks", "all", "--max-examples", str(MAX_EXAMPLES)]
        # one worker: hypothesis's lambda-description cache is not thread-safe (a KeyError inside schemathesis
        # with -w 2, seen here with schemathesis 4.32.5 and hypothesis 6.170)
        cli += ["--workers", "1", "--no-shrink", "--generation-database", "none", "--no-color"]
        if request.param == "keys":
            cli += ["--header", f"Authorization: Bearer {KEY}"]
        run = subprocess.run(cli, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in log.read_text().splitlines():
            answer = json.loads(line)
            counts[answer["op"]][(answer["method"], answer["status"])] += 1
        by_status = collections.Counter(status for c in counts.values() for (_, status) in c.elements())
        events = {s: n for (m, s), n in counts["POST /v1/events"].items() if m == "POST"}
        total = sum(by_status.values())
        print(f"\nschemathesis ({request.param}): {total} requests, by status {dict(sorted(by_status.items()))}, ")
        print(f"POST /v1/events by status {dict(sorted(events.items()))}; {run.stdout.strip().splitlines()[-1]}")
        yield request.param, counts, run.returncode, run.stdout + run.stderr
    finally:
        server.stop()
        shutil.rmtree(work / "schemathesis-report", ignore_errors=True)


def test_schemathesis_finds_nothing(fuzzed: tuple[str, dict[str, collections.Counter], int, str]) -> None:
    mode, counts, code, output = fuzzed
    assert code == 0, "\n".join(line[:300] for line in output.splitlines()[-400:])
    assert "No issues found" in output, output[-3000:]
    operations = {
        "POST /v1/events",
        "GET /v1/users/{user_id}/recommendations",
        "GET /v1/users/{user_id}",
        "DELETE /v1/users/{user_id}",
        "GET /v1/items",
        "GET /v1/model",
        "GET /healthz",
        "GET /readyz",
    }
    assert operations <= set(counts), set(counts)
    total = sum(sum(c.values()) for c in counts.values())
    assert total >= 500, total
    statuses = collections.Counter(status for c in counts.values() for (_, status) in c.elements())
    assert not [s for s in statuses if s >= 500], statuses
    events = {status: n for (method, status), n in counts["POST /v1/events"].items() if method == "POST"}
    assert events.get(200, 0) > sum(events.values()) / 2, events
    if mode == "keys":
        assert statuses[401] > 0  # ignored_auth sent requests without the key, and they were refused
