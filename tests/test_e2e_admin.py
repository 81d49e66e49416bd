"""Server admins: /config, enforcement of every rule, the audit log and /stats, end to end."""

from __future__ import annotations

import io
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from bench.harness import Harness
from bot.charts import COLORS
from bot.discord_front import policy
from bot.localdiscord.client import ControlClient, ControlError


def rows(h: Harness, table: str = "jobs") -> list[dict[str, Any]]:
    with sqlite3.connect(h.settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]


async def reply_to(c: ControlClient, sent: dict[str, Any], user_id: int) -> dict[str, Any]:
    return await c.wait_for_message(
        lambda m: m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"],
        viewer=user_id,
        timeout=60,
    )


async def admin(
    c: ControlClient, command: str, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    admin_id = await c.admin_id()
    sent = await c.slash(command, options or {}, user_id=admin_id)
    return await reply_to(c, sent, admin_id)


async def imagine(
    c: ControlClient,
    prompt: str = "a fox",
    *,
    user_id: int | None = None,
    channel_id: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run /imagine and return the first message for it: an ephemeral refusal or the result."""
    user = user_id or await c.member_id()
    sent = await c.slash(
        "imagine", {"prompt": prompt, "steps": 1, **options}, user_id=user, channel_id=channel_id
    )
    return await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"]
            and (bool(m["flags"] & 64) or bool(m["attachments"]))
        ),
        viewer=user,
        channel_id=channel_id,
        timeout=60,
    )


def refused(msg: dict[str, Any]) -> bool:
    return bool(msg["flags"] & 64) and not msg["attachments"]


async def test_config_needs_manage_server_even_if_the_client_shows_it(harness: Harness) -> None:
    c = harness.control
    member = await c.member_id()
    with pytest.raises(ControlError, match="permission"):
        await c.slash("config show", user_id=member)
    sent = await c.slash(
        "config set", {"key": "max_steps", "value": "1"}, user_id=member, validate=False
    )
    reply = await reply_to(c, sent, member)
    assert reply["flags"] & 64 and "Manage Server" in reply["content"]
    assert rows(harness, "guild_settings") == [] and rows(harness, "audit_log") == []
    shown = await admin(c, "config show")
    assert "`max_steps` = **150**" in shown["content"]


async def test_limits_channels_and_bans_refuse_then_let_the_next_allowed_request_through(
    harness: Harness,
) -> None:
    c = harness.control
    world = await c.world()
    general, art = (int(ch["id"]) for ch in world["channels"])

    assert (
        "now **10**"
        in (await admin(c, "config set", {"key": "max_steps", "value": "10"}))["content"]
    )
    msg = await imagine(c, steps=20)
    assert refused(msg) and "more than this server allows (10)" in msg["content"]
    assert not refused(await imagine(c, steps=5))

    await admin(c, "config channels add", {"channel": art})
    msg = await imagine(c, channel_id=general)
    assert refused(msg) and f"<#{art}>" in msg["content"]
    assert not refused(await imagine(c, channel_id=art))
    await admin(c, "config channels remove", {"channel": art})

    member = await c.member_id()
    await admin(c, "config ban", {"user": member, "reason": "spam"})
    msg = await imagine(c)
    assert refused(msg) and "spam" in msg["content"]
    await admin(c, "config unban", {"user": member})
    assert not refused(await imagine(c))

    reasons = [r["reason"] for r in rows(harness) if r["status"] == "rejected"]
    assert reasons == ["limit", "channel", "banned"]
    actions = [(a["action"], a["key"]) for a in rows(harness, "audit_log")]
    assert actions == [
        ("set", "max_steps"),
        ("add:guild_channels", "channel_id"),
        ("remove:guild_channels", "channel_id"),
        ("ban", str(member)),
        ("unban", str(member)),
    ]


@pytest.mark.parametrize("prompt", ["a Dragon", "A DRAGÓN in the sky", "ｄｒａｇｏｎ"])
async def test_blocked_words_ignore_case_and_accents(harness: Harness, prompt: str) -> None:
    c = harness.control
    await admin(c, "config blocklist add", {"pattern": "dragon"})
    msg = await imagine(c, prompt)
    assert refused(msg) and "blocks" in msg["content"] and "dragon" not in msg["content"].lower()
    assert not refused(await imagine(c, "a dragonfly"))


async def test_cooldown_says_when_to_try_again(harness: Harness) -> None:
    c = harness.control
    await admin(c, "config set", {"key": "cooldown_seconds", "value": "600"})
    assert not refused(await imagine(c))
    msg = await imagine(c)
    assert refused(msg) and "start another job in 9m" in msg["content"]
    assert not refused(await imagine(c, user_id=await c.admin_id()))  # moderators are exempt


async def test_daily_quota_resets_at_midnight_utc(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.control
    today = datetime.now(UTC).replace(microsecond=0)
    monkeypatch.setattr(policy, "utcnow", lambda: today.replace(hour=23, minute=59, second=50))
    await admin(c, "config set", {"key": "daily_quota", "value": "2"})
    assert not refused(await imagine(c))
    assert not refused(await imagine(c))
    msg = await imagine(c)
    assert refused(msg) and "daily quota of 2" in msg["content"] and "in 10s" in msg["content"]
    tomorrow = (today + timedelta(days=1)).replace(hour=0, minute=0, second=10)
    monkeypatch.setattr(policy, "utcnow", lambda: tomorrow)
    assert not refused(await imagine(c))
    # A per-member override beats the server's quota.
    monkeypatch.setattr(policy, "utcnow", lambda: today.replace(hour=23, minute=59, second=50))
    await admin(c, "config quota", {"user": await c.member_id(), "daily": 10})
    assert not refused(await imagine(c))


async def test_allowed_models_and_defaults(harness: Harness) -> None:
    c = harness.control
    msg = await admin(c, "config set", {"key": "allowed_models", "value": "nonexistent"})
    assert "Unknown model" in msg["content"]
    await admin(c, "config set", {"key": "allowed_models", "value": "tiny"})
    await admin(c, "config set", {"key": "default_steps", "value": "3"})
    sent = await c.slash("imagine", {"prompt": "defaults"})
    msg = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"]
            and bool(m["attachments"])
        )
    )
    assert "3 steps" in msg["content"]
    shown = await admin(c, "config show")
    assert "✎ `default_steps` = **3**" in shown["content"] and "Recent changes" in shown["content"]


async def test_stats_draws_a_real_chart_from_the_rows(harness: Harness) -> None:
    c = harness.control
    for _ in range(3):
        await imagine(c)
    await admin(c, "config set", {"key": "max_steps", "value": "1"})
    await imagine(c, steps=5)  # refused
    admin_id = await c.admin_id()
    sent = await c.slash("stats", {"period": "week"}, user_id=admin_id)
    msg = await reply_to(c, sent, admin_id)
    assert "3 jobs · 3 images" in msg["content"] and "1 refused" in msg["content"]
    chart = Image.open(io.BytesIO(await c.download(msg["attachments"][0]))).convert("RGB")
    assert chart.size == (800, 400)
    # Today's bar is the last of seven: its column has the txt2img colour, the first day's not.
    colours_last = {chart.getpixel((x, 300)) for x in range(700, 784)}
    colours_first = {chart.getpixel((x, 300)) for x in range(48, 140)}
    assert COLORS["txt2img"] in colours_last and COLORS["txt2img"] not in colours_first
