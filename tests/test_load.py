"""The load test of bench/load_bench.py in a reduced size: nothing is lost under load."""

from __future__ import annotations

from pathlib import Path

from bench.load_bench import run_load


async def test_a_burst_of_members_loses_nothing(model_cache: Path) -> None:
    report = await run_load(jobs=80, users=16, duration=3.0, cache_dir=model_cache)
    assert report.lost == 0
    assert report.rows == report.requests == 80
    assert report.unexplained_refusals == 0
    assert set(report.statuses) <= {"finished", "rejected"}
    assert report.statuses.get("finished", 0) >= 40
    assert report.ack_p99_ms < 3000, "every request was acknowledged within Discord's 3 s"
