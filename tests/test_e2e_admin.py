"""Server admins: /config, enforcement of every rule, the audit log and /stats, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from bench.harness import Harness
from bot import blocklist, rules
from bot.charts import COLORS
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
    monkeypatch.setattr(rules, "utcnow", lambda: today.replace(hour=23, minute=59, second=50))
    await admin(c, "config set", {"key": "daily_quota", "value": "2"})
    assert not refused(await imagine(c))
    assert not refused(await imagine(c))
    msg = await imagine(c)
    assert refused(msg) and "daily quota of 2" in msg["content"] and "in 10s" in msg["content"]
    tomorrow = (today + timedelta(days=1)).replace(hour=0, minute=0, second=10)
    monkeypatch.setattr(rules, "utcnow", lambda: tomorrow)
    assert not refused(await imagine(c))
    # A per-member override beats the server's quota.
    monkeypatch.setattr(rules, "utcnow", lambda: today.replace(hour=23, minute=59, second=50))
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


# Backtracks exponentially: `re` needs seconds for 35 characters, the `regex` package minutes.
SLOW_ENTRY = "re:(a|aa)+$"
SLOW_PROMPT = "a" * 35 + "!"


async def store_unchecked(h: Harness, entry: str) -> None:
    """Store a blocklist entry the way an older version did: without probing it."""
    guild_id = int((await h.control.world())["guild_id"])
    admin_id = await h.control.admin_id()
    await h.bot.services.guild_configs.add("blocked_words", "pattern", guild_id, entry, by=admin_id)


@contextlib.asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """Gaps between ticks of the one event loop the bot, the local server and the test share:
    a bot frozen by a pattern shows as a gap as long as the match."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    try:
        yield gaps
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_backtracking_pattern_is_refused_when_added(harness: Harness) -> None:
    c = harness.control
    msg = await admin(c, "config blocklist add", {"pattern": SLOW_ENTRY})
    assert msg["flags"] & 64 and "too slow" in msg["content"] and "`re:a+b`" in msg["content"]
    msg = await admin(c, "config blocklist add", {"pattern": "re:(unclosed"})
    assert msg["flags"] & 64 and "regular expression is invalid" in msg["content"]
    assert rows(harness, "blocked_words") == [] and rows(harness, "audit_log") == []
    msg = await admin(c, "config blocklist add", {"pattern": "re:\\bcats?\\b"})
    assert msg["content"] == "✅ Blocking `re:\\bcats?\\b`."
    assert [r["pattern"] for r in rows(harness, "blocked_words")] == ["re:\\bcats?\\b"]


async def reply_within(
    c: ControlClient, sent: dict[str, Any], user_id: int, timeout: float
) -> dict[str, Any] | None:
    """The reply to `sent`, or None: a bot frozen past Discord's 3 s window never answers."""
    try:
        return await c.wait_for_message(
            lambda m: m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"],
            viewer=user_id,
            timeout=timeout,
        )
    except TimeoutError:
        return None


async def test_a_slow_stored_pattern_refuses_quickly_without_freezing_the_bot(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=blocklist.__name__)
    c = harness.control
    member = await c.member_id()
    await store_unchecked(harness, SLOW_ENTRY)
    async with loop_gaps() as gaps:
        started = time.monotonic()
        sent = await c.slash("imagine", {"prompt": SLOW_PROMPT, "steps": 1})
        msg = await reply_within(c, sent, member, timeout=10)
        took = time.monotonic() - started
    assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.1f}s"
    assert msg is not None and refused(msg) and "this server blocks" in msg["content"]
    assert took < 1.5, f"refused after {took:.1f}s"
    assert [r["reason"] for r in rows(harness)] == ["blocked_word"]
    # Refused because the match ran out of time (a timeout counts as blocked), not a match.
    assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_other_members_are_answered_while_a_slow_pattern_is_matched(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A longer deadline keeps the match running long enough to watch the bot meanwhile (and
    # short of Discord's 3 s window, or the refusal would come too late to be delivered).
    monkeypatch.setattr(blocklist, "MATCH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(blocklist, "REQUEST_BUDGET_S", 1.0)
    c = harness.control
    await store_unchecked(harness, SLOW_ENTRY)
    other = await c.add_user("other")
    member = await c.member_id()
    async with loop_gaps() as gaps:
        slow = await c.slash("imagine", {"prompt": SLOW_PROMPT, "steps": 1}, wait=False)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        queue = await c.slash("queue", user_id=other)
        acked = time.monotonic() - started
        meanwhile = await c.interaction(slow["interaction"]["id"])
        msg = await reply_within(c, slow, member, timeout=10)
    assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.1f}s"
    assert queue["response"] is not None and acked < 1.0, f"acknowledged after {acked:.1f}s"
    assert meanwhile["callback_type"] is None, "the slow prompt was answered before the other"
    assert msg is not None and refused(msg) and "this server blocks" in msg["content"]
    assert [r["reason"] for r in rows(harness)] == ["blocked_word"]


async def test_reset_puts_a_setting_back_to_its_default(harness: Harness) -> None:
    c = harness.control
    await admin(c, "config set", {"key": "max_steps", "value": "2"})
    assert refused(await imagine(c, steps=3))
    msg = await admin(c, "config reset", {"key": "max_steps"})
    assert msg["flags"] & 64 and msg["content"] == "↩️ `max_steps` is back to **150**."
    assert rows(harness, "guild_settings") == []
    audit = [(a["action"], a["key"], a["old"], a["new"]) for a in rows(harness, "audit_log")]
    assert audit == [("set", "max_steps", None, "2"), ("reset", "max_steps", "2", None)]
    assert not refused(await imagine(c, steps=3))
    assert "· `max_steps` = **150**" in (await admin(c, "config show"))["content"]


async def test_channels_list_shows_the_allow_list(harness: Harness) -> None:
    c = harness.control
    general, art = (int(ch["id"]) for ch in (await c.world())["channels"])
    msg = await admin(c, "config channels list")
    assert msg["flags"] & 64 and msg["content"] == "All channels (the list is empty)."
    await admin(c, "config channels add", {"channel": art})
    await admin(c, "config channels add", {"channel": general})
    listed = (await admin(c, "config channels list"))["content"].split(", ")
    assert sorted(listed) == sorted([f"<#{art}>", f"<#{general}>"])
    await admin(c, "config channels remove", {"channel": general})
    assert (await admin(c, "config channels list"))["content"] == f"<#{art}>"


async def test_blocklist_list_and_remove(harness: Harness) -> None:
    c = harness.control
    msg = await admin(c, "config blocklist list")
    assert msg["flags"] & 64 and msg["content"] == "Nothing is blocked."
    await admin(c, "config blocklist add", {"pattern": "dragon"})
    await admin(c, "config blocklist add", {"pattern": "re:^cats?"})
    listed = await admin(c, "config blocklist list")
    assert listed["flags"] & 64 and listed["content"] == "• `dragon`\n• `re:^cats?`"
    assert refused(await imagine(c, "a dragon"))

    msg = await admin(c, "config blocklist remove", {"pattern": "dragon"})
    assert msg["flags"] & 64 and msg["content"] == "✅ `dragon` is allowed again."
    assert [r["pattern"] for r in rows(harness, "blocked_words")] == ["re:^cats?"]
    removal = rows(harness, "audit_log")[-1]
    assert (removal["action"], removal["old"]) == ("remove:blocked_words", "dragon")
    assert not refused(await imagine(c, "a dragon"))
    assert refused(await imagine(c, "cats at night"))

    msg = await admin(c, "config blocklist remove", {"pattern": "dragon"})
    assert msg["content"] == "`dragon` was not blocked."
    assert (await admin(c, "config blocklist list"))["content"] == "• `re:^cats?`"
    assert [r["reason"] for r in rows(harness) if r["status"] == "rejected"] == [
        "blocked_word",
        "blocked_word",
    ]
