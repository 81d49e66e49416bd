"""Load test: many members at once through the local Discord server and the real bot.

    python -m bench.load_bench                  # 500 jobs from 100 users over 30 s, tiny model
    python -m bench.load_bench --jobs 60 --users 12 --duration 5
    python -m bench.load_bench --blame          # also: where the bot's loop spent its time
    python -m bench.load_bench --engine standin # a GPU stand-in: the bot's own lag on a CPU box
    python -m bench.load_bench --api-share 0.5  # half the members call the A1111 API instead

The local server and the members it plays run in a process of their own (as Discord and its
users are elsewhere), so the lag measured is the bot's own: how long its gateway heartbeats,
other commands and progress edits wait on its event loop.

Prints a table and exits non-zero unless: every interaction was acknowledged within Discord's
3 s, every one got a reply (its result, a refusal or a failure notice), every request has a
job row and every accepted job ended in a final state, and the loop lag p99 is under 10 ms;
with an API share, also unless every API request was answered, none with a server error, and
each has its job row.
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

from bench.api_load import ApiCalls, ApiFigures, call_txt2img, make_keys
from bench.harness import free_port, running_bot
from bench.load_report import CPU_LIMIT_MS, LAG_P99_LIMIT_MS, LoadReport
from bench.loop_watch import LoopWatch, quantile
from bench.standin_engine import StandInEngine
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.settings import load_settings

if TYPE_CHECKING:
    from bot.engine import Engine

#: Discord drops an interaction not acknowledged within this window.
ACK_WINDOW_S = 3.0
#: Final states of a job the executor accepted (a refused request ends as `rejected`).
FINAL = ("finished", "failed", "cancelled", "interrupted")
#: The job row a reply should match: a result, a refusal or a failure notice.
MATCHING_ROW = {"result": "finished", "refusal": "rejected", "failure": "failed"}
#: After the last job ends, how long replies may still be on their way.
REPLY_GRACE_S = 15.0


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
    api: ApiCalls = field(default_factory=ApiCalls)
    api_requests: int = 0


async def add_members(server: LocalDiscord, users: int) -> list[int]:
    """`users` members in the server (run in the server's process)."""
    return [server.world.add_user(f"user{i}").id for i in range(users)]


async def play_members(
    server: LocalDiscord,
    *,
    jobs: int,
    user_ids: Sequence[int],
    duration: float,
    seed: int,
    api_keys: dict[int, str] | None = None,
    api_url: str = "",
) -> Members:
    """`jobs` requests from the members `user_ids`, arriving at random over `duration` s (run
    in the server's process, on its loop): /imagine, or for the members with a key in
    `api_keys` (by index), txt2img through the HTTP API at `api_url`."""
    rng = random.Random(seed)
    out = Members()
    keys = api_keys or {}
    users = len(user_ids)
    async with aiohttp.ClientSession() as session:
        c = ControlClient(server.base_url, session, token=server.control_token)
        delays = [rng.uniform(0, duration) for _ in range(jobs)]

        async def one(i: int) -> None:
            await asyncio.sleep(delays[i])
            key = keys.get(i % users)
            if key is not None:
                await call_txt2img(session, api_url, key, i, out.api)
                return
            options = {"prompt": f"load test {i}", "steps": 2, "seed": i}
            sent = await c.slash("imagine", options, user_id=user_ids[i % users])
            out.ids.append(int(sent["interaction"]["id"]))

        out.api_requests = sum(1 for i in range(jobs) if i % users in keys)
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
    api_share: float = 0.0,
    **setting_overrides: Any,
) -> LoadReport:
    """Run the load against a fresh bot, watching its loop with `watch` (or a new one);
    `setting_overrides` are bot settings (e.g. `user_queue_limit=2`). With `api_share`, that
    share of the members calls the HTTP API instead of Discord."""
    api_users = round(users * api_share)
    if api_users:
        setting_overrides.setdefault("api_bind", f"127.0.0.1:{free_port()}")
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
            user_ids = await server.call(add_members, users)
            world = await h.control.world()
            api_keys = await make_keys(
                h.bot.services.db,
                guild_id=int(world["guild_id"]),
                channel_id=int(world["channels"][0]["id"]),
                user_ids={i: user_ids[i] for i in range(api_users)},
            )
            watch = watch or LoopWatch()
            started = time.perf_counter()
            async with watch:
                members = await server.call(
                    play_members, jobs=jobs, user_ids=user_ids, duration=duration, seed=seed,
                    api_keys=api_keys, api_url=f"http://{settings.api_bind}",
                )  # fmt: skip
                ids = members.ids
                await server.call(settle, ids, db_path, timeout)
                final = await server.call(summaries, ids)
            seconds = time.perf_counter() - started
        with sqlite3.connect(db_path) as conn:
            rows: list[Any] = conn.execute(
                "SELECT interaction_id, status, reason FROM jobs"
            ).fetchall()
            api_rows: list[Any] = conn.execute(
                "SELECT status FROM jobs WHERE command LIKE 'api:%'"
            ).fetchall()
    status_of = {r[0]: r[1] for r in rows}
    sent_ids = set(ids)
    measured = [r for r in rows if r[0] in sent_ids]
    statuses = Counter(r[1] for r in measured)
    acks = [s["callback_after_s"] for s in final if s["callback_after_s"] is not None]
    kinds = {int(s["id"]): reply_kind(s) for s in final}
    lag = watch.lag_ms
    return LoadReport(
        requests=jobs - members.api_requests,
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
        api=ApiFigures.of(members.api_requests, members.api, api_rows) if api_users else None,
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
        "--api-share",
        type=float,
        default=0.0,
        help="share of the members (0 to 1) who call the A1111-compatible HTTP API instead",
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
            api_share=args.api_share,
        )
    )
    via = f", {args.api_share:.0%} of the users through the HTTP API" if args.api_share else ""
    print(
        f"load test: {args.jobs} requests from {args.users} users over "
        f"{args.duration:g} s{via} ({what}, {os.cpu_count()} cores)"
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
