"""`sdbot bench serve`: the Ray Serve backend's figures, measured side by side in one run.

    python -m bench.serve_bench                  # tiny model, CPU, Ray started in-process: ~2 min
    python -m bench.serve_bench --device cuda --size 512 --steps 20 --model NAME

Figures and the targets of issue 11:
- per-job overhead of Serve vs the local engine: the same small job, alternately on the local
  engine and through a replica (64 px tiny: <= 15 ms),
- throughput of 2 replicas vs 1, the same jobs from several users through the executor
  (>= 1.3x; on CPU each replica is one torch thread on its own core),
- a light member's wait behind a heavy member's queue, through Serve with 2 replicas (<= 2
  job-times).

Ray starts in this process as the bot's SDBOT_SERVE_ADDRESS=local does (no dashboard, a capped
object store) and stops at the end; everything runs on a throwaway SQLite database; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.executor_bench import BenchError, Row, done_ok, render, submit_job
from bot.db import Database
from bot.errors import SdbotError
from bot.executor import GpuExecutor, Worker
from bot.jobs import GenerationRequest
from bot.settings import Settings, load_settings

MS = 1000.0


def request(args: argparse.Namespace, user: int, index: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"a lighthouse at dusk (user {user}, job {index})",
        model=args.model,
        width=kw.pop("size", args.size),
        height=kw.pop("size_h", args.size),
        steps=kw.pop("steps", args.steps),
        seed=1000 * user + index,
        **kw,
    )


@contextlib.asynccontextmanager
async def executor(engines: Sequence[Any], db: Database, **kw: Any) -> AsyncIterator[GpuExecutor]:
    kw.setdefault("queue_limit", 10_000)
    kw.setdefault("user_queue_limit", 10_000)
    workers = [Worker(e, name=f"bench-serve-{i}") for i, e in enumerate(engines)]
    ex: GpuExecutor[Any] = GpuExecutor(db=db, workers=workers, **kw)
    await ex.start()
    try:
        yield ex
    finally:
        await ex.close()


def overhead(args: argparse.Namespace, local: Any, remote: Any) -> dict[str, float]:
    """Median seconds of one job, alternately local and through Serve (same request)."""
    job = request(args, 1, 0, size=64, steps=args.overhead_steps)
    for _ in range(3):  # warm both: first calls pay for lazy set-up on each side
        local.generate([job])
        remote.generate([job])
    on_local: list[float] = []
    on_serve: list[float] = []
    for _ in range(args.overhead_jobs):
        started = time.perf_counter()
        local.generate([job])
        on_local.append(time.perf_counter() - started)
        started = time.perf_counter()
        remote.generate([job])
        on_serve.append(time.perf_counter() - started)
    return {"local": statistics.median(on_local), "serve": statistics.median(on_serve)}


async def throughput(
    args: argparse.Namespace, engines: Sequence[Any], db: Database
) -> tuple[float, float]:
    """Jobs per second, args.jobs jobs from args.users users queued at once; and this
    process's CPU seconds per job meanwhile (the bot's share of the machine)."""
    async with executor(engines, db, max_batch=args.batch) as ex:
        # Warm every replica slot (its first call loads nothing, but pays for routing set-up).
        await asyncio.gather(
            *[(await submit_job(ex, 99, request(args, 99, i)))[2] for i in range(len(engines))]
        )
        started, cpu = time.perf_counter(), time.process_time()
        tasks = [
            (await submit_job(ex, 1 + i % args.users, request(args, 1 + i % args.users, i)))[2]
            for i in range(args.jobs)
        ]
        timings = done_ok(await asyncio.gather(*tasks))
        assert all(t.finished for t in timings)
        rate = args.jobs / (max(t.finished or 0 for t in timings) - started)
        return rate, (time.process_time() - cpu) / args.jobs


async def fairness(
    args: argparse.Namespace, engines: Sequence[Any], db: Database
) -> dict[str, float]:
    """A heavy member queues args.heavy jobs; mid-way through one, a light member asks for one.
    The wait is in job-times: the median run of the heavy member's jobs."""
    waits: list[float] = []
    async with executor(engines, db, max_batch=1) as ex:
        for trial in range(3):
            heavy = [
                await submit_job(ex, 1, request(args, 1, 100 * trial + i))
                for i in range(args.heavy)
            ]
            first = heavy[0][1]
            while first.started is None:
                await asyncio.sleep(0.001)
            while first.finished is None:  # one whole job, to know a job-time
                await asyncio.sleep(0.001)
            job_s = first.finished - (first.started or 0)
            await asyncio.sleep(job_s / 2)
            _, light, task = await submit_job(ex, 2, request(args, 2, trial))
            await task
            if light.error or light.started is None:
                raise BenchError(f"the light member's job failed: {light.error}")
            runs = [
                t.finished - t.started
                for _, t, _ in heavy
                if t.started is not None and t.finished is not None and not t.error
            ]
            waits.append((light.started - light.submitted) / statistics.median(runs))
            for job, _, _ in heavy:
                await ex.cancel(job.id)
            await asyncio.gather(*(task for _, _, task in heavy))
    return {"wait": statistics.median(waits), "worst": max(waits)}


async def run(args: argparse.Namespace) -> tuple[list[Row], str]:
    # Ray is an optional extra, and slow to import: only here.
    import torch

    from bot.engine import Engine
    from bot.serve.app import AppOptions
    from bot.serve.cluster import replica_settings, serve_engines

    # One torch thread on each side, so that CPU figures compare like with like (on CPU each
    # replica is one thread on its own core).
    threads = 1 if args.device == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    say = print if args.verbose else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(prefix="sdbot-serve-bench-") as tmp:
        settings: Settings = load_settings(
            _env_file=None,
            db_path=Path(tmp) / "bench.db",
            cache_dir=args.cache_dir,
            device=args.device,
            default_model=args.model,
            backend="serve",
            serve_address="local",
            serve_replicas=1,
            serve_app="sdbot-bench",
            preview_every=0,
        )
        local = Engine(device=args.device, cache_dir=args.cache_dir)
        print("loading the model locally…", file=sys.stderr)
        local.load(args.model)  # the tiny model is built here, once, before replicas load it
        gpus = torch.cuda.device_count() if args.device != "cpu" else 0

        def options(replicas: int) -> AppOptions:
            return AppOptions(
                replicas=replicas,
                gpus_per_replica=min(1.0, gpus / replicas),  # replicas share a lone GPU
                cpus_per_replica=1,
                torch_threads=threads,
                settings=replica_settings(settings),
            )

        db = await Database.open(settings.db_path)
        try:
            print("starting Ray and two replicas…", file=sys.stderr)
            async with serve_engines(settings, options=options(2)) as engines:
                print("per-job overhead, local and Serve alternately…", file=sys.stderr)
                cost = await asyncio.to_thread(overhead, args, local, engines[0])
                say(cost)
                # One worker slot keeps one replica busy at a time, two keep both: alternate
                # rounds of each, so that a noisy neighbour weighs on both alike.
                rates: dict[int, list[float]] = {1: [], 2: []}
                cpus: dict[int, list[float]] = {1: [], 2: []}
                for round_no in range(args.rounds):
                    for slots in (1, 2):
                        say(f"throughput round {round_no + 1}, {slots} replica(s)…")
                        rate, cpu = await throughput(args, engines[:slots], db)
                        rates[slots].append(rate)
                        cpus[slots].append(cpu)
                        say(slots, rate, cpu)
                print("fairness through Serve…", file=sys.stderr)
                fair = await fairness(args, engines, db)
                used = {r for e in engines for call in e.calls for r in call.replicas}
        finally:
            await db.close()
    extra = (cost["serve"] - cost["local"]) * MS
    rate_1, rate_2 = statistics.median(rates[1]), statistics.median(rates[2])
    cpu_1, cpu_2 = statistics.median(cpus[1]), statistics.median(cpus[2])
    speedup = rate_2 / rate_1
    rows = [
        Row(
            "per-job overhead, Serve - local",
            f"{extra:.1f} ms",
            "<= 15 ms",
            extra <= 15,
            f"64px {args.overhead_steps} steps: local {cost['local'] * MS:.1f} ms, "
            f"Serve {cost['serve'] * MS:.1f} ms (medians of {args.overhead_jobs})",
        ),
        Row(
            "throughput, 2 replicas / 1",
            f"{speedup:.2f}x",
            ">= 1.3x",
            speedup >= 1.3,
            f"{rate_1:.2f} -> {rate_2:.2f} jobs/s (medians of {args.rounds} alternating rounds); "
            f"{args.jobs} jobs, {args.users} users, "
            f"max_batch {args.batch}; {len(used)} replicas used; bot CPU/job "
            f"{cpu_1 * MS:.0f} -> {cpu_2 * MS:.0f} ms",
        ),
        Row(
            "light member's wait behind a heavy one",
            f"{fair['wait']:.2f} job-times",
            "<= 2",
            fair["worst"] <= 2,
            f"worst of 3: {fair['worst']:.2f}; heavy member queued {args.heavy}",
        ),
    ]
    where = f"{args.device}, Ray Serve in-process"
    return rows, where


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sdbot bench serve", description="Measure the Ray Serve backend (issue 11's figures)."
    )
    p.add_argument("--model", default="builtin:tiny", help="model source (default: builtin:tiny)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--size", type=int, default=64, help="image size for throughput (default: 64)")
    p.add_argument("--steps", type=int, default=20, help="steps per throughput job (default: 20)")
    p.add_argument("--batch", type=int, default=4, help="the executor's max_batch (default: 4)")
    p.add_argument("--jobs", type=int, default=24, help="jobs per throughput run (default: 24)")
    p.add_argument("--users", type=int, default=4, help="users sharing them (default: 4)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (default: 3)")
    p.add_argument("--heavy", type=int, default=8, help="heavy member's queue (default: 8)")
    p.add_argument("--overhead-jobs", type=int, default=20, help="jobs per side (default: 20)")
    p.add_argument("--overhead-steps", type=int, default=4, help="their steps (default: 4)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("data/cache"),
        help="where models are cached / the tiny model is built (default: data/cache)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.cache_dir = args.cache_dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sdbot bench serve` (argv after `serve`) and `python -m`."""
    args = parse_args(argv)
    # Ray 2.60 turns token auth on for new local clusters (and writes ~/.ray/auth_token).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    try:
        rows, where = asyncio.run(run(args))
    except (BenchError, SdbotError) as exc:
        print(f"bench failed: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    header = (
        f"sdbot bench serve: {args.model} on {where}, {args.size}x{args.size}, {args.steps} "
        f"steps; {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}; "
        f"took {time.perf_counter() - started:.0f}s"
    )
    print(render(rows, header))
    missed = [r.metric for r in rows if r.ok is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
