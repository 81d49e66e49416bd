"""Models this machine cannot load, end to end: /models and the model autocomplete mark them,
and a job naming one is refused at once (with the reason and a `rejected` row) instead of
failing after its wait, while the model that can load keeps serving."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bench.harness import Harness, running_bot
from bot.engine import Engine
from bot.settings import Settings

CATALOG = """
[models.tiny]
source = "builtin:tiny"
native_size = 64
description = "The tiny test model."

[models.ghost]
source = "sdbot-tests/never-downloaded"
native_size = 64
description = "A Hub model the cache does not hold."

[models.gone]
source = "./no-such-folder"
native_size = 64
description = "A local folder that is not there."
"""


@pytest.fixture
async def harness(
    settings: Settings, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    # Offline, a Hub model that is not in the cache cannot load (online it might download).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models.toml"
    models.write_text(CATALOG, encoding="utf-8")
    async with running_bot(settings.model_copy(update={"models_file": models}), engine=engine) as h:
        yield h


def jobs(h: Harness) -> list[dict[str, Any]]:
    with sqlite3.connect(h.settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]


async def ephemeral(h: Harness, interaction_id: str, *, timeout: float = 60) -> str:
    member = await h.control.member_id()
    msg = await h.control.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == interaction_id and bool(m["flags"] & 64)
        ),
        viewer=member,
        timeout=timeout,
    )
    return str(msg["content"])


async def test_models_that_cannot_load_are_marked_and_refused_before_queueing(
    harness: Harness,
) -> None:
    c = harness.control
    sent = await c.slash("imagine", {"prompt": "a red fox", "steps": 2, "model": "tiny"})
    await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"]
            and bool(m["attachments"])
        ),
        timeout=90,
    )

    listed = await ephemeral(harness, (await c.slash("models"))["interaction"]["id"])
    lines = listed.splitlines()
    ghost = lines.index(next(line for line in lines if "**ghost**" in line))
    assert lines[ghost].startswith("⊘ **ghost**"), listed
    assert lines[ghost + 1].strip() == "A Hub model the cache does not hold."
    assert lines[ghost + 2].strip().startswith("⊘ unavailable: Model `ghost`")
    assert "not downloaded yet" in lines[ghost + 2]
    assert any(line.startswith("⊘ **gone**") for line in lines), listed
    assert "⊘ unavailable: The model folder of model `gone` does not exist" in listed
    assert any(line.startswith("● **tiny**") for line in lines), listed
    assert "no-such-folder" not in listed  # a reason never names a path

    suggested = await c.autocomplete("imagine", "model", {"prompt": "x"})
    assert [(s["name"], s["value"]) for s in suggested] == [
        ("tiny", "tiny"),
        ("ghost (not downloaded)", "ghost"),
        ("gone (unavailable)", "gone"),
    ]

    refused = await c.slash("imagine", {"prompt": "a grey owl", "steps": 2, "model": "ghost"})
    said = await ephemeral(harness, refused["interaction"]["id"], timeout=30)
    assert "Model `ghost`" in said and "not downloaded yet" in said, said
    rows = jobs(harness)
    assert [(r["model"], r["status"]) for r in rows] == [
        ("tiny", "finished"),
        ("ghost", "rejected"),
    ]
    assert "not downloaded yet" in rows[-1]["error"]
    # Refused before the engine saw it: nothing was evicted to make room for it.
    assert "tiny" in harness.bot.services.backend.status().loaded_models
