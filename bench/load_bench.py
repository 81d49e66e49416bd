"""Load test: many members at once through the local Discord server and the real bot.

    python -m bench.load_bench                  # 500 jobs from 100 users over 30 s, tiny model
    python -m bench.load_bench --jobs 60 --users 12 --duration 5
    python -m bench.load_bench --blame          # also: where the bot's loop spent its time
    python -m bench.load_bench --engine standin # a GPU stand-in: the bot's own lag on a CPU box

The local server and the members it plays run in a process of their own (as Discord and its
users are elsewhere), so the lag measured is the bot's own: how long its gateway heartbeats,
other commands and progress edits wait on its event loop.

Prints a table and exits non-zero unless: every interaction was acknowledged within Discord's
3 s, every one got a reply (its result, a refusal or a failure notice), every request has a
job row and every accepted job ended in a final state, and the loop lag p99 is under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp

from bench.harness import running_bot
from bench.loop_watch import LoopWatch, quantile
from bench.standin_engine import StandInEngine
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.settings import load_settings

if TYPE_CHECKING:
    from bot.engine import Engine

#: Discord drops an interaction not acknowledged within this window.
ACK_WINDOW_S = 3.0
LAG_P99_LIMIT_MS = 10.0
#: No callback on the bot's loop may compute this long: that is heavy work, whatever the load.
CPU_LIMIT_MS = 50.0
#: Final states of a job the executor accepted (a refused request ends as `rejected`).
FINAL = ("finished", "failed", "cancelled", "interrupted")
#: The job row a reply should match: a result, a refusal or a failure notice.
MATCHING_ROW = {"result": "finished", "refusal": "rejected", "failure": "failed"}
#: After the last job ends, how long replies may still be on their way.
REPLY_GRACE_S = 15.0


@dataclass
class LoadReport:
    requests: int
    sent: int
    statuses: dict[str, int]
    refusal_reasons: dict[str, int]
    unexplained_refusals: int
    lost: int
    rows: int
    not_final: int
    acked: int
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    replies: dict[str, int]
    mismatched: int
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    lag_samples: int
    #: The lag p99 less the loop thread's waits for a core (None where unmeasured).
    lag_in_process_p99_ms: float | None
    #: The loop callback that computed longest (CPU, less GC), and how long.
    heaviest_ms: float
    heaviest: str
    gc_max_ms: float
    seconds: float
    lag_limit_ms: float | None = LAG_P99_LIMIT_MS
    cpu_limit_ms: float | None = CPU_LIMIT_MS
    errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """What failed the run; empty when it passed."""
        out = [f"{self.requests - self.sent} requests could not be sent"] if self.errors else []
        if self.acked < self.sent:
            out.append(f"{self.sent - self.acked} interactions not acknowledged within 3 s")
        if self.replies.get("none", 0):
            out.append(f"{self.replies['none']} interactions got no reply")
        if self.mismatched:
            out.append(f"{self.mismatched} replies do not match their job row")
        if self.lost or self.rows != self.sent:
            out.append(f"{self.lost} requests lost (no job row); {self.rows} rows")
        if self.not_final:
            out.append(f"{self.not_final} accepted jobs not in a final state")
        if self.unexplained_refusals:
            out.append(f"{self.unexplained_refusals} refusals without a reason")
        if self.lag_limit_ms is not None and self.lag_p99_ms >= self.lag_limit_ms:
            out.append(f"event-loop lag p99 {self.lag_p99_ms:.1f} ms >= {self.lag_limit_ms:g} ms")
        if self.cpu_limit_ms is not None and self.heaviest_ms >= self.cpu_limit_ms:
            out.append(f"a loop callback computed {self.heaviest_ms:.0f} ms: {self.heaviest}")
        return out

    def table(self) -> str:
        s = self.statuses
        others = {k: v for k, v in s.items() if k not in ("finished", "rejected", "failed")}
        rows = [
            ("requests sent", f"{self.sent} of {self.requests}"),
            ("acknowledged within 3 s", f"{self.acked} of {self.sent}"),
            ("time to acknowledge p50 / p99 / max", _ms(self.ack_p50_ms, self.ack_p99_ms,
                                                         self.ack_max_ms)),
            ("replies", _counts(self.replies, ("result", "refusal", "failure", "none"))),
            ("replies not matching the job row", str(self.mismatched)),
            ("job rows", f"{self.rows}  (lost: {self.lost})"),
            ("finished", str(s.get("finished", 0))),
            ("refused", f"{s.get('rejected', 0)}  {dict(self.refusal_reasons)}"),
            ("failed", str(s.get("failed", 0))),
            ("other final states", str(others or 0)),
            ("accepted jobs not final", str(self.not_final)),
            ("refusals without a reason", str(self.unexplained_refusals)),
            ("bot event-loop lag p50 / p99 / max", _ms(self.lag_p50_ms, self.lag_p99_ms,
                                                        self.lag_max_ms)
             + f"  ({self.lag_samples} samples)"),
            ("  less waits for a free core: p99", _opt_ms(self.lag_in_process_p99_ms)),
            ("heaviest loop callback (CPU less GC)", f"{self.heaviest_ms:.1f} ms  {self.heaviest}"),
            ("longest GC pause (any thread)", f"{self.gc_max_ms:.1f} ms"),
            ("wall time", f"{self.seconds:.1f} s"),
        ]  # fmt: skip
        return "\n".join(f"{name:<38}{value}" for name, value in rows)


def _ms(*values: float) -> str:
    return " / ".join(f"{v:.1f}" for v in values) + " ms"


def _opt_ms(value: float | None) -> str:
    return "not measured (needs Linux schedstat)" if value is None else f"{value:.1f} ms"


def _counts(counts: dict[str, int], keys: Sequence[str]) -> str:
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in keys)


def reply_kind(summary: dict[str, Any]) -> str:
    """What the member last saw in answer: result, refusal, failure, or none (still the
    'thinking' or a progress message). Refusals are the only ephemeral replies, results the only
    public followups; progress and failures both edit the deferred message, failures with ❌."""
    reply = summary.get("last_reply")
    if reply is None:
        return "none"
    if reply["ephemeral"]:
        return "refusal"
    if reply["how"] == "followup":
        return "result"
    return "failure" if str(reply["content"]).startswith("❌") else "none"


@dataclass
class Members:
    """The interactions the members' requests became, and the requests that failed outright."""

    ids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def play_members(
    server: LocalDiscord, *, jobs: int, users: int, duration: float, seed: int
) -> Members:
    """`jobs` /imagine requests from `users` members, arriving at random over `duration` s
    (run in the server's process, on its loop)."""
    rng = random.Random(seed)
    out = Members()
    async with aiohttp.ClientSession() as session:
        c = ControlClient(server.base_url, session, token=server.control_token)
        user_ids = [await c.add_user(f"user{i}") for i in range(users)]
        delays = [rng.uniform(0, duration) for _ in range(jobs)]

        async def one(i: int) -> None:
            await asyncio.sleep(delays[i])
            options = {"prompt": f"load test {i}", "steps": 2, "seed": i}
            sent = await c.slash("imagine", options, user_id=user_ids[i % users])
            out.ids.append(int(sent["interaction"]["id"]))

        results = await asyncio.gather(*(one(i) for i in range(jobs)), return_exceptions=True)
    out.errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return out


async def settle(server: LocalDiscord, ids: Sequence[int], db_path: Path, timeout: float) -> None:
    """Wait (in the server's process) until no job is queued or running and every member has a
    reply, or until `timeout`; replies get REPLY_GRACE_S after the last job ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(_active_jobs, db_path):
            deadline = min(deadline, time.monotonic() + REPLY_GRACE_S)
            world = server.world.interactions
            if all(reply_kind(world[i].summary()) != "none" for i in ids):
                return
        await asyncio.sleep(0.2)


def _active_jobs(db_path: Path) -> int:
    with sqlite3.connect(db_path) as conn:
        sql = "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
        return int(conn.execute(sql).fetchone()[0])


async def run_load(
    *,
    jobs: int,
    users: int,
    duration: float,
    cache_dir: Path,
    seed: int = 0,
    timeout: float = 600,
    lag_limit_ms: float | None = LAG_P99_LIMIT_MS,
    cpu_limit_ms: float | None = CPU_LIMIT_MS,
    device: str = "cpu",
    watch: LoopWatch | None = None,
    engine: Engine | StandInEngine | None = None,
    **setting_overrides: Any,
) -> LoadReport:
    """Run the load against a fresh bot, watching its loop with `watch` (or a new one);
    `setting_overrides` are bot settings (e.g. `user_queue_limit=2`)."""
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "load.db"
        settings = load_settings(
            **{"log_level": "WARNING", **setting_overrides},
            _env_file=None,
            db_path=db_path,
            cache_dir=cache_dir,
            device=device,
        )
        # The stand-in follows the engine contract the executor uses, not all of Engine.
        bot_engine = cast("Engine | None", engine)
        async with running_bot(settings, engine=bot_engine, server_process=True) as h:
            server = h.process
            assert server is not None
            await _warm_up(h.control)
            watch = watch or LoopWatch()
            started = time.perf_counter()
            async with watch:
                members = await server.call(
                    play_members, jobs=jobs, users=users, duration=duration, seed=seed
                )
                ids = members.ids
                await server.call(settle, ids, db_path, timeout)
                final = await server.call(summaries, ids)
            seconds = time.perf_counter() - started
        with sqlite3.connect(db_path) as conn:
            rows: list[Any] = conn.execute(
                "SELECT interaction_id, status, reason FROM jobs"
            ).fetchall()
    status_of = {r[0]: r[1] for r in rows}
    sent_ids = set(ids)
    measured = [r for r in rows if r[0] in sent_ids]
    statuses = Counter(r[1] for r in measured)
    acks = [s["callback_after_s"] for s in final if s["callback_after_s"] is not None]
    kinds = {int(s["id"]): reply_kind(s) for s in final}
    lag = watch.lag_ms
    return LoadReport(
        requests=jobs,
        sent=len(ids),
        statuses=dict(statuses),
        refusal_reasons=dict(Counter(r[2] for r in measured if r[1] == "rejected")),
        unexplained_refusals=sum(1 for r in measured if r[1] == "rejected" and not r[2]),
        lost=sum(1 for i in ids if i not in status_of),
        rows=len(measured),
        not_final=sum(1 for r in measured if r[1] not in (*FINAL, "rejected")),
        acked=sum(1 for a in acks if a <= ACK_WINDOW_S),
        ack_p50_ms=statistics.median(acks) * 1000 if acks else 0.0,
        ack_p99_ms=quantile(acks, 0.99) * 1000,
        ack_max_ms=max(acks, default=0.0) * 1000,
        replies=dict(Counter(kinds.values())),
        mismatched=sum(
            1 for i, k in kinds.items() if k != "none" and status_of.get(i) != MATCHING_ROW[k]
        ),
        lag_p50_ms=quantile(lag, 0.5),
        lag_p99_ms=quantile(lag, 0.99),
        lag_max_ms=max(lag, default=0.0),
        lag_samples=len(lag),
        lag_in_process_p99_ms=quantile(watch.lag_less_core_wait_ms, 0.99)
        if watch.lag_less_core_wait_ms
        else None,
        heaviest_ms=watch.max_cpu_ms,
        heaviest=watch.heaviest.what if watch.heaviest else "-",
        gc_max_ms=max((p.seconds for p in watch.gc_pauses), default=0.0) * 1000,
        seconds=seconds,
        lag_limit_ms=lag_limit_ms,
        cpu_limit_ms=cpu_limit_ms,
        errors=members.errors,
    )


async def summaries(server: LocalDiscord, ids: Sequence[int]) -> list[dict[str, Any]]:
    return [server.world.interactions[i].summary() for i in ids]


async def _warm_up(control: ControlClient) -> None:
    """One job first, so the model load (seconds of a busy GPU thread) is not in the figures."""
    user = await control.add_user("warm-up")
    sent = await control.slash("imagine", {"prompt": "warm up", "steps": 2}, user_id=user)
    iid = sent["interaction"]["id"]
    deadline = time.monotonic() + 300
    while reply_kind(await control.interaction(iid)) == "none":
        if time.monotonic() > deadline:
            raise TimeoutError("the warm-up job got no reply within 300 s")
        await asyncio.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdbot bench load", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds over which requests arrive"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"))
    parser.add_argument(
        "--engine",
        choices=("auto", "tiny", "standin"),
        default="auto",
        help="tiny: the tiny model, real diffusion; standin: a GPU stand-in that sleeps through "
        "each step (bench/standin_engine.py), for the bot's own lag on a machine without a GPU; "
        "auto (default): tiny on a GPU, the stand-in on CPU, where diffusion would take a core "
        "and the GIL from the bot as no GPU deployment does",
    )
    parser.add_argument("--device", default="cpu", help="for the tiny model: cpu, cuda, ...")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="intra-op threads for the tiny model on CPU (default: all cores but one, which a "
        "GPU would leave to the event loop)",
    )
    parser.add_argument(
        "--blame",
        action="store_true",
        help="also sample where slow loop callbacks were (perturbs the lag a little)",
    )
    args = parser.parse_args(argv)
    if args.engine == "auto":
        args.engine = "standin" if args.device == "cpu" else "tiny"
    engine: Engine | StandInEngine | None = None
    if args.engine == "standin":
        engine, what = StandInEngine(), "a GPU stand-in"
    else:
        import torch

        torch.set_num_threads(args.torch_threads)
        what = f"tiny model on {args.device}, {args.torch_threads} torch threads"
    watch = LoopWatch(stacks=args.blame)
    report = asyncio.run(
        run_load(
            jobs=args.jobs,
            users=args.users,
            duration=args.duration,
            cache_dir=args.cache_dir,
            device=args.device,
            watch=watch,
            engine=engine,
        )
    )
    print(
        f"load test: {args.jobs} /imagine requests from {args.users} users over "
        f"{args.duration:g} s ({what}, {os.cpu_count()} cores)"
    )
    print(report.table())
    if args.blame:
        print(watch.details())
    problems = report.problems()
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
