"""/imagine through the local Discord server with the real discord.py client, tiny model, SQLite."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
import statistics
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.harness import Harness, running_bot
from bot.engine import Engine
from bot.imaging import parse_parameters, read_parameters
from bot.jobs import GenerationRequest
from bot.localdiscord.client import ControlClient, ControlError
from bot.settings import Settings


def rows(harness: Harness) -> list[dict[str, Any]]:
    with sqlite3.connect(harness.settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]


def has_png(msg: dict[str, Any]) -> bool:
    return any(a["content_type"] == "image/png" for a in msg["attachments"])


async def result_for(
    control: ControlClient, interaction_id: str, timeout: float = 60
) -> dict[str, Any]:
    """The public message carrying the PNG for one interaction."""
    return await control.wait_for_message(
        lambda m: (
            has_png(m)
            and "seed `" in m["content"]
            and m.get("interaction_metadata", {}).get("id") == interaction_id
        ),
        timeout=timeout,
    )


async def test_imagine_defers_in_time_and_replies_with_a_reproducible_png(
    harness: Harness, engine: Engine
) -> None:
    control = harness.control
    sent = await control.slash(
        "imagine",
        {"prompt": "a red fox in snow", "steps": 4, "size": "96x64", "seed": 1234},
    )
    ack = sent["interaction"]
    assert ack["callback_type"] == 5, "the bot must defer (thinking) before generating"
    assert ack["callback_after_s"] < 3.0

    msg = await result_for(control, ack["id"])
    assert "1234" in msg["content"] and "96×64" in msg["content"]
    png = await control.download(msg["attachments"][0])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (96, 64)
    params = parse_parameters(read_parameters(png) or "")
    assert params["prompt"] == "a red fox in snow"
    assert params["Seed"] == "1234" and params["Steps"] == "4" and params["Size"] == "96x64"

    # The seed in the reply reproduces the exact image.
    again = engine.generate(
        [
            GenerationRequest(
                prompt="a red fox in snow",
                model="builtin:tiny",
                width=96,
                height=64,
                steps=4,
                seed=1234,
            )
        ]
    )[0].images[0]
    assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(image.convert("RGB")))

    # Only the result stays in the channel: the progress message made way for it.
    assert [m["id"] for m in await control.messages()] == [msg["id"]]

    [row] = rows(harness)
    assert row["status"] == "finished" and row["command"] == "imagine"
    assert (row["prompt"], row["width"], row["height"], row["steps"], row["seed"]) == (
        "a red fox in snow", 96, 64, 4, 1234,
    )  # fmt: skip
    assert row["user_id"] == await control.member_id()
    assert row["started_at"] and row["finished_at"] and row["duration_s"] > 0
    assert json.loads(row["params"])["guidance"] == 7.0


async def test_a_random_seed_is_chosen_recorded_and_reported(harness: Harness) -> None:
    sent = await harness.control.slash("imagine", {"prompt": "a castle", "steps": 2})
    msg = await result_for(harness.control, sent["interaction"]["id"])
    seed = int(re.search(r"seed `(\d+)`", msg["content"]).group(1))  # type: ignore[union-attr]
    png = await harness.control.download(msg["attachments"][0])
    assert parse_parameters(read_parameters(png) or "")["Seed"] == str(seed)
    [row] = rows(harness)
    assert row["seed"] == seed and row["status"] == "finished"
    # The default size is the model's native one (64 for the tiny model).
    assert Image.open(io.BytesIO(png)).size == (64, 64)


async def test_sizes_are_snapped_to_multiples_of_8(harness: Harness) -> None:
    sent = await harness.control.slash("imagine", {"prompt": "snap", "steps": 1, "size": "100x64"})
    msg = await result_for(harness.control, sent["interaction"]["id"])
    png = await harness.control.download(msg["attachments"][0])
    assert Image.open(io.BytesIO(png)).size == (96, 64)


BAD_INPUTS = [
    pytest.param({"prompt": "x", "steps": 0}, "steps 0 is out of range", id="steps-zero"),
    pytest.param({"prompt": "x", "steps": 500}, "steps 500 is out of range", id="steps-huge"),
    pytest.param(
        {"prompt": "x", "size": "10000x64"}, "width 10000 is out of range", id="width-huge"
    ),
    pytest.param({"prompt": "x", "size": "64x8"}, "is not WIDTHxHEIGHT", id="height-tiny"),
    pytest.param({"prompt": "x", "size": "64x16"}, "height 16 is out of range", id="height-small"),
    pytest.param({"prompt": "x", "size": "big"}, "is not WIDTHxHEIGHT", id="size-words"),
    pytest.param({"prompt": "x", "model": "nope"}, "Unknown model", id="model-unknown"),
    pytest.param({"prompt": "x", "scheduler": "Warp"}, "Warp", id="scheduler-unknown"),
    pytest.param({"prompt": "x", "lora": "ghost"}, "Unknown LoRA", id="lora-unknown"),
    pytest.param({"prompt": "x", "guidance": 99}, "guidance 99", id="guidance-huge"),
    pytest.param({"prompt": "x", "seed": -5}, "seed", id="seed-negative"),
    pytest.param({"prompt": "   "}, "prompt is empty", id="prompt-blank"),
    pytest.param({"prompt": "y" * 5000}, "5000 characters", id="prompt-5000"),
]


@pytest.mark.parametrize(("options", "expected"), BAD_INPUTS)
async def test_bad_input_gets_an_ephemeral_error_a_rejected_row_and_the_bot_keeps_serving(
    harness: Harness, options: dict[str, Any], expected: str
) -> None:
    control = harness.control
    member = await control.member_id()
    # validate=False plays a modified client: the bot must enforce its limits itself.
    sent = await control.slash("imagine", options, validate=False)
    assert sent["interaction"]["callback_type"] == 4
    reply = await control.wait_for_message(
        lambda m: m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"],
        viewer=member,
    )
    assert reply["flags"] & 64, "errors are ephemeral"
    assert expected in reply["content"]
    assert "Traceback" not in reply["content"]
    # Nobody else sees it.
    others = await control.messages(viewer=await control.admin_id())
    assert reply["id"] not in [m["id"] for m in others]

    [row] = rows(harness)
    assert row["status"] == "rejected" and row["reason"] == "invalid"
    assert expected in row["error"]

    good = await control.slash("imagine", {"prompt": "still works", "steps": 1})
    await result_for(control, good["interaction"]["id"])
    assert [r["status"] for r in rows(harness)] == ["rejected", "finished"]


async def test_the_local_server_refuses_what_discord_refuses(harness: Harness) -> None:
    control = harness.control
    with pytest.raises(ControlError, match="steps: must be at most 150"):
        await control.slash("imagine", {"prompt": "x", "steps": 500})
    with pytest.raises(ControlError, match="missing required option"):
        await control.slash("imagine", {"steps": 5})
    with pytest.raises(ControlError, match="not synced"):
        await control.slash("nonexistent", {})
    assert rows(harness) == []


async def test_a_full_queue_refuses_at_once_and_records_why(
    settings: Settings, engine: Engine
) -> None:
    limited = settings.model_copy(update={"queue_limit": 1})
    async with running_bot(limited, engine=engine) as h:
        c = h.control
        first = await c.slash("imagine", {"prompt": "long one", "steps": 60, "size": "256x256"})
        # Wait until the first job runs, so the next one waits in the queue.
        for _ in range(200):
            if [r["status"] for r in rows(h)] == ["running"]:
                break
            await asyncio.sleep(0.02)
        second = await c.slash("imagine", {"prompt": "waits", "steps": 1})
        third = await c.slash("imagine", {"prompt": "refused", "steps": 1})
        assert third["interaction"]["callback_type"] == 4
        refusal = await c.wait_for_message(
            lambda m: m.get("interaction_metadata", {}).get("id") == third["interaction"]["id"],
            viewer=await c.member_id(),
        )
        assert refusal["flags"] & 64 and "queue is full" in refusal["content"]
        await result_for(c, first["interaction"]["id"])
        await result_for(c, second["interaction"]["id"])
        statuses = {r["prompt"]: (r["status"], r["reason"]) for r in rows(h)}
        assert statuses == {
            "long one": ("finished", None),
            "waits": ("finished", None),
            "refused": ("rejected", "queue_full"),
        }


async def test_progress_is_shown_while_a_job_runs(harness: Harness) -> None:
    control = harness.control
    sent = await control.slash("imagine", {"prompt": "slow", "steps": 100, "size": "256x256"})
    original = sent["interaction"]["original_message_id"]
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msgs = {m["id"]: m for m in await control.messages()}
        if original in msgs:
            seen.add(msgs[original]["content"])
        if any(has_png(m) for m in msgs.values()):
            break
        await asyncio.sleep(0.05)
    assert any(re.search(r"step \d+/100", text) for text in seen), seen


async def test_the_event_loop_stays_responsive_during_a_long_job(harness: Harness) -> None:
    control = harness.control
    sent = await control.slash("imagine", {"prompt": "long", "steps": 150, "size": "256x256"})
    for _ in range(500):
        if [r["status"] for r in rows(harness)] == ["running"]:
            break
        await asyncio.sleep(0.01)
    lags: list[float] = []
    interval = 0.005
    while [r["status"] for r in rows(harness)] == ["running"] and len(lags) < 400:
        start = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(time.perf_counter() - start - interval)
    assert len(lags) >= 50, "the job finished too fast to measure anything"
    p99 = statistics.quantiles(lags, n=100)[98]
    assert p99 < 0.05, f"event loop lag p99 {p99 * 1000:.1f} ms"
    await result_for(control, sent["interaction"]["id"])
