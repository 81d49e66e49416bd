"""Blocked words and admin regexes: matched with a deadline, off the event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.blocklist import check_entry, find_blocked, first_blocked, normalize
from bot.errors import InvalidRequest
from bot.jobs import MAX_PROMPT_CHARS


@pytest.mark.parametrize("entry", ["re:(a|aa)+$", "re:(a+)+$", "re:(x+x+)+y", "re:(\\w+\\s?)+$"])
def test_a_backtracking_pattern_is_refused_when_added(entry: str) -> None:
    with pytest.raises(InvalidRequest, match="too slow"):
        check_entry(entry)


@pytest.mark.parametrize(
    "entry", ["re:\\bcats?\\b", "dog", "re:^nsfw", "bad word", "re:[0-9]{3}-x"]
)
def test_ordinary_entries_are_accepted(entry: str) -> None:
    assert check_entry(entry) == entry


def test_an_invalid_or_oversized_entry_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="invalid"):
        check_entry("re:(unclosed")
    with pytest.raises(InvalidRequest, match="limit"):
        check_entry("x" * 201)
    with pytest.raises(InvalidRequest, match="empty"):
        check_entry("re:")


def test_normalize_folds_case_accents_and_width() -> None:
    assert normalize("Ñaïve ＤＲＡＧÓＮ") == "naive dragon"


@pytest.mark.parametrize(
    ("prompt", "entries", "hit"),
    [
        ("a DRAGÓN", ["dragon"], "dragon"),
        ("dragonfly", ["dragon"], None),
        ("big red car", ["red car"], "red car"),
        ("gore-fest", ["re:gor+e"], "re:gor+e"),
        ("anything", ["re:[", "thing"], None),  # a broken stored regex never matches nor crashes
    ],
)
def test_first_blocked(prompt: str, entries: list[str], hit: str | None) -> None:
    assert first_blocked([prompt], entries) == hit


def test_words_match_whole_words_ignoring_case_and_accents() -> None:
    assert first_blocked(["A NAÏVE cat"], ["naive"]) == "naive"
    assert first_blocked(["naiveté"], ["naive"]) is None
    assert first_blocked(["", "ugly CAT"], ["re:c.t$"]) == "re:c.t$"


def test_a_stored_slow_pattern_is_cut_off_and_counts_as_blocked() -> None:
    # Stored before patterns were probed on the way in: this froze the bot for seconds.
    slow = "re:(a|aa)+$"
    started = time.monotonic()
    assert asyncio.run(find_blocked(["a" * 35 + "!"], [slow])) == slow
    assert time.monotonic() - started < 1.0


def test_prompt_limits_apply_before_any_matching() -> None:
    with pytest.raises(InvalidRequest, match="limit"):
        first_blocked(["a" * (MAX_PROMPT_CHARS + 1)], ["dog"])


async def test_the_event_loop_keeps_running_while_a_pattern_is_matched() -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    entries = ["re:(a|aa)+$", "re:(a|a)+$", "re:(.*a){12}x"]
    assert await find_blocked(["a" * 200 + "!", "a" * 900], entries) is not None
    task.cancel()
    assert max(gaps) < 0.1
