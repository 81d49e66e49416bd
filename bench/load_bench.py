"""Load test: many members at once through the local Discord server and the real bot.

    python -m bench.load_bench                  # 500 jobs from 100 users on the tiny model
    python -m bench.load_bench --jobs 60 --users 12 --duration 5

Reports completed / refused / failed counts (0 lost: every request ends as a job row, and
every refusal carries a reason), p50/p99 time to the first response (the defer), p99
event-loop lag, and the row count against the number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import running_bot
from bot.settings import load_settings


@dataclass
class LoadReport:
    requests: int
    statuses: dict[str, int]
    refusal_reasons: dict[str, int]
    unexplained_refusals: int
    lost: int
    rows: int
    ack_p50_ms: float
    ack_p99_ms: float
    lag_p99_ms: float
    seconds: float

    def table(self) -> str:
        lines = [
            f"{'requests sent':<38}{self.requests}",
            f"{'job rows':<38}{self.rows}  (lost: {self.lost})",
            f"{'finished':<38}{self.statuses.get('finished', 0)}",
            f"{'refused':<38}{self.statuses.get('rejected', 0)}  {dict(self.refusal_reasons)}",
            f"{'failed':<38}{self.statuses.get('failed', 0)}",
            f"{'refusals without a reason':<38}{self.unexplained_refusals}",
            f"{'time to first response p50 / p99':<38}"
            f"{self.ack_p50_ms:.1f} / {self.ack_p99_ms:.1f} ms",
            f"{'event-loop lag p99':<38}{self.lag_p99_ms:.1f} ms",
            f"{'wall time':<38}{self.seconds:.1f} s",
        ]
        return "\n".join(lines)


async def _lag_monitor(samples: list[float], stop: asyncio.Event, interval: float = 0.01) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(interval)
        samples.append(time.perf_counter() - start - interval)


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(
    *, jobs: int, users: int, duration: float, cache_dir: Path, seed: int = 0, timeout: float = 600
) -> LoadReport:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "load.db"
        settings = load_settings(
            _env_file=None, db_path=db_path, cache_dir=cache_dir, device="cpu", log_level="WARNING"
        )
        async with running_bot(settings) as h:
            c = h.control
            user_ids = [await c.add_user(f"user{i}") for i in range(users)]
            lag: list[float] = []
            stop = asyncio.Event()
            monitor = asyncio.create_task(_lag_monitor(lag, stop))
            started = time.perf_counter()
            acks: list[float] = []
            interaction_ids: list[int] = []

            async def one(i: int) -> None:
                await asyncio.sleep(rng.uniform(0, duration))
                sent = await c.slash(
                    "imagine",
                    {"prompt": f"load test {i}", "steps": 2, "seed": i},
                    user_id=user_ids[i % users],
                )
                interaction_ids.append(int(sent["interaction"]["id"]))
                if sent["interaction"]["callback_after_s"] is not None:
                    acks.append(sent["interaction"]["callback_after_s"])

            await asyncio.gather(*(one(i) for i in range(jobs)))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with sqlite3.connect(db_path) as conn:
                    active = conn.execute(
                        "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                    ).fetchone()[0]
                if not active:
                    break
                await asyncio.sleep(0.2)
            stop.set()
            await monitor
            seconds = time.perf_counter() - started
        with sqlite3.connect(db_path) as conn:
            rows: list[Any] = conn.execute(
                "SELECT interaction_id, status, reason FROM jobs"
            ).fetchall()
    by_interaction = {r[0] for r in rows}
    statuses = Counter(r[1] for r in rows)
    reasons = Counter(r[2] for r in rows if r[1] == "rejected")
    return LoadReport(
        requests=jobs,
        statuses=dict(statuses),
        refusal_reasons=dict(reasons),
        unexplained_refusals=sum(1 for r in rows if r[1] == "rejected" and not r[2]),
        lost=sum(1 for i in interaction_ids if i not in by_interaction)
        + (jobs - len(interaction_ids)),
        rows=len(rows),
        ack_p50_ms=statistics.median(acks) * 1000 if acks else 0.0,
        ack_p99_ms=_quantile(acks, 0.99) * 1000,
        lag_p99_ms=_quantile(lag, 0.99) * 1000,
        seconds=seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdbot bench load", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds over which requests arrive"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"))
    args = parser.parse_args(argv)
    report = asyncio.run(
        run_load(jobs=args.jobs, users=args.users, duration=args.duration, cache_dir=args.cache_dir)
    )
    print(
        f"load test: {args.jobs} /imagine requests from {args.users} users over {args.duration:g} s"
    )
    print(report.table())
    ok = report.lost == 0 and report.unexplained_refusals == 0 and report.rows == report.requests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
