"""The load test of bench/load_bench.py in a reduced size: under a burst of members every
interaction is acknowledged within Discord's 3 s and answered, nothing is lost, and nothing
heavy runs on the bot's event loop.

The bench's own bound, loop-lag p99 under 10 ms, is not asserted here: this test shares two
cores with the rest of the suite (and whatever else runs), and wall-clock lag counts every
wait for a core or the GIL. What is asserted instead holds on any machine: no loop callback
computes for 50 ms (CPU time, which waiting does not add to), and the loop never stalls for
long (p99 under 250 ms, a bound only a blocked loop misses).
"""

from __future__ import annotations

from pathlib import Path

from bench.load_bench import run_load
from bot.engine import Engine

LOOSE_LAG_P99_MS = 250.0


async def test_a_burst_of_members_is_answered_in_time_and_loses_nothing(
    model_cache: Path, engine: Engine
) -> None:
    report = await run_load(
        jobs=80,
        users=16,
        duration=3.0,
        cache_dir=model_cache,
        engine=engine,
        lag_limit_ms=LOOSE_LAG_P99_MS,
        # Two queued jobs a member: some of the burst is refused, and must be told so.
        user_queue_limit=2,
    )
    print(report.table())
    assert report.errors == []
    assert report.sent == report.requests == 80
    assert report.acked == report.sent, "every interaction acknowledged within 3 s"
    assert report.replies.get("none", 0) == 0, "every member got a result or a refusal"
    assert report.mismatched == 0, "each reply matches its job row"
    assert report.lost == 0
    assert report.rows == 80
    assert report.not_final == 0, "every accepted job ended"
    assert report.unexplained_refusals == 0
    assert set(report.statuses) <= {"finished", "rejected"}
    assert report.statuses.get("finished", 0) >= 16
    assert report.heaviest_ms < 50, f"heavy work on the event loop: {report.heaviest}"
    assert report.lag_p99_ms < LOOSE_LAG_P99_MS
    assert report.problems() == []
