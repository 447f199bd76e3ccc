"""Schemathesis hooks of tests/test_fuzz.py (loaded by ``SCHEMATHESIS_HOOKS=tests.fuzz_hooks``).

- Positive ``POST /v1/events`` bodies get item ids of the served catalogue (``HYTREC_FUZZ_ITEM_IDS``: a file
  of ids, one a line, from ``GET /v1/items``), so the cases exercise the model, not only the unknown-item path.
  Negative bodies are left alone: replacing their ids could make them valid.
- Every answer is recorded (``HYTREC_FUZZ_LOG``: JSON lines of operation, status, mode), so the test can count
  cases by operation and status instead of trusting the summary line.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

_ITEMS = Path(os.environ["HYTREC_FUZZ_ITEM_IDS"]).read_text().split()
_LOG = Path(os.environ["HYTREC_FUZZ_LOG"])
_LOCK = threading.Lock()
_RNG = random.Random(0)


def _negative_body(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or meta.is_negative_at(ParameterLocation.BODY)


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if case.operation.path != "/v1/events" or _negative_body(case) or not isinstance(case.body, dict):
        return case
    for event in case.body.get("events") or []:
        if isinstance(event, dict) and "item_id" in event:
            event["item_id"] = _RNG.choice(_ITEMS)
    return case


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    meta = getattr(case, "meta", None)
    body: Any = None
    if case.operation.path == "/v1/events" and response.status_code == 200:
        body = response.json()
    line = {
        "op": f"{case.operation.method.upper()} {case.operation.path}",
        "method": case.method,
        "status": response.status_code,
        "mode": meta.generation.mode.value if meta is not None else None,
        "ingest": body,
    }
    with _LOCK, _LOG.open("a") as f:
        f.write(json.dumps(line) + "\n")
