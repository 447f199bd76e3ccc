"""Generated docs stay true: the settings and metrics tables equal what the code renders."""

from __future__ import annotations

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from hytrec.docs import GENERATED, REPO, render_page, settings_table, update


def test_generated_tables_match_the_code() -> None:
    assert update(check=True) == [], "docs drifted from the code: run `hytrec docs`"


def test_every_setting_and_metric_appears_in_the_docs() -> None:
    from hytrec.service.settings import Settings

    pages = {page: (REPO / page).read_text() for page in GENERATED}
    text = "\n".join(pages.values())
    for name in Settings.model_fields:  # the service's settings include the store's
        assert f"`HYTREC_{name.upper()}`" in text
    assert "`HYTREC_CAS_MAX_RETRIES` | `16` |" in pages["docs/state_store.md"]  # a default as the code has it


def test_render_replaces_only_the_block() -> None:
    page = "intro\n<!-- generated:x -->\nold\nrows\n<!-- /generated:x -->\noutro\n"
    assert render_page(page, {"x": lambda: "new"}) == "intro\n<!-- generated:x -->\nnew\n<!-- /generated:x -->\noutro\n"
    with pytest.raises(ValueError, match="no generated block 'y'"):
        render_page(page, {"y": lambda: ""})


def test_a_setting_without_description_is_refused() -> None:
    class Bad(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="X_")
        documented: int = Field(1, description="fine")
        silent: int = 2

    with pytest.raises(ValueError, match="Bad.silent has no description"):
        settings_table(Bad)
