"""Generated parts of the docs: the settings and metrics tables, rendered from the classes that define them.

Each table sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in a Markdown page.
``hytrec docs`` rewrites them; ``tests/test_docs.py`` fails when a page differs from what the code renders,
so a new setting or metric cannot go undocumented and a changed default cannot leave the docs behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(info: Any) -> str:
    extra = info.json_schema_extra or {}
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    if info.default_factory is not None:
        return "computed"
    value = info.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def settings_table(cls: type[BaseSettings], skip: tuple[type[BaseSettings], ...] = ()) -> str:
    """One row per field of ``cls`` (less the fields of ``skip``): variable, default, meaning."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    inherited = {name for base in skip for name in base.model_fields}
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in cls.model_fields.items():
        if name in inherited:
            continue
        if not info.description:
            raise ValueError(f"setting {cls.__name__}.{name} has no description")
        rows.append(f"| `{prefix}{name.upper()}` | {_default(info)} | {_cell(info.description)} |")
    return "\n".join(rows)


def metrics_table(module: Any) -> str:
    """One row per Prometheus metric defined at the top level of ``module``."""
    from prometheus_client.metrics import MetricWrapperBase

    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            kind = value._type  # noqa: SLF001 - prometheus_client keeps the type here
            labels = ", ".join(value._labelnames)  # noqa: SLF001
            name = value._name + ("_total" if kind == "counter" else "")  # noqa: SLF001
            rows.append(f"| `{name}` | {kind} | {labels} | {_cell(value._documentation)} |")  # noqa: SLF001
    return "\n".join(rows)


def _service_settings() -> str:
    from hytrec.service.settings import Settings
    from hytrec.state_store.settings import StoreSettings

    return settings_table(Settings, skip=(StoreSettings,))


def _store_settings() -> str:
    from hytrec.state_store.settings import StoreSettings

    return settings_table(StoreSettings)


def _service_metrics() -> str:
    from hytrec.service import metrics

    return metrics_table(metrics)


def _store_metrics() -> str:
    from hytrec.state_store import metrics

    return metrics_table(metrics)


def _stream_metrics() -> str:
    from hytrec.streams import metrics

    return metrics_table(metrics)


# page -> {block name: renderer}
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "docs/service.md": {"service-settings": _service_settings, "service-metrics": _service_metrics},
    "docs/state_store.md": {"store-settings": _store_settings, "store-metrics": _store_metrics},
    "docs/streams.md": {"stream-metrics": _stream_metrics},
}


def render_page(text: str, blocks: dict[str, Callable[[], str]]) -> str:
    """``text`` with every generated block replaced by its renderer's output."""
    for name, render in blocks.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no generated block {name!r} in the page")
        text = pattern.sub(lambda m, body=render(): m.group(1) + body + "\n" + m.group(2), text)
    return text


def update(root: Path = REPO, check: bool = False) -> list[str]:
    """Rewrite the generated blocks (or, with ``check``, only list the pages that differ)."""
    stale = []
    for page, blocks in GENERATED.items():
        path = root / page
        old = path.read_text()
        new = render_page(old, blocks)
        if new != old:
            stale.append(page)
            if not check:
                path.write_text(new)
    return stale
