"""`sdbot bench`: the GPU executor's figures, each measured side by side in one run.

    python -m bench.executor_bench                       # tiny model, CPU: well under 5 minutes
    python -m bench.executor_bench --device cuda --size 512 --steps 20 \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5

Figures and the targets of issue 4:
- GPU-thread busy time / wall time while the queue never runs dry (>= 0.97),
- 16 compatible jobs from 4 users, micro-batched vs one at a time, next to the pipeline's own
  batch-of-4 speed-up measured in the same rounds (executor / pipeline >= 0.9),
- event-loop lag p50/p99 while saturated (p99 < 10 ms),
- a light user's wait, in job-times, behind a heavy user's 20 queued jobs (<= 2; FIFO: 20),
- model memory with txt2img, img2img and inpaint loaded / txt2img alone (<= 1.05).

Everything runs on one engine and a throwaway SQLite database; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bot.backend import Failed, Finished, Job, JobOrigin, Started
from bot.catalog import Catalog, probe_native_size
from bot.db import Database
from bot.errors import InvalidRequest
from bot.executor import GpuExecutor
from bot.jobs import GenerationRequest

log = logging.getLogger("bench")


class BenchError(RuntimeError):
    pass


@dataclass
class Row:
    metric: str
    measured: str
    target: str = ""
    ok: bool | None = None
    note: str = ""


@dataclass
class Timing:
    submitted: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    engine: Any
    db: Database

    def request(self, user: int, index: int, **extra: Any) -> GenerationRequest:
        return GenerationRequest(
            prompt=f"a lighthouse at dusk, oil painting (user {user}, job {index})",
            model=self.args.model,
            width=self.args.size,
            height=self.args.size,
            steps=self.args.steps,
            seed=100_000 * user + index,
            **extra,
        )

    @contextlib.asynccontextmanager
    async def executor(self, **options: Any) -> AsyncIterator[GpuExecutor]:
        options.setdefault("queue_limit", 10_000)
        options.setdefault("user_queue_limit", 10_000)
        options.setdefault("max_batch", self.args.batch)
        ex = GpuExecutor(self.engine, self.db, **options)
        await ex.start()
        try:
            yield ex
        finally:
            await ex.close()


def origin(user: int) -> JobOrigin:
    return JobOrigin(
        user_id=user, user_name=f"bench{user}", guild_id=None, channel_id=None, command="bench"
    )


async def follow(job: Job, timing: Timing) -> Timing:
    """What a cog does with a job's events, minus Discord: read them as they come."""
    async for event in job.stream():
        if isinstance(event, Started):
            timing.started = time.perf_counter()
        elif isinstance(event, Finished):
            timing.finished = time.perf_counter()
        elif isinstance(event, Failed):
            timing.finished = time.perf_counter()
            timing.error = event.error.message
    return timing


async def submit(ex: GpuExecutor, user: int, request: GenerationRequest) -> asyncio.Task[Timing]:
    return (await submit_job(ex, user, request))[2]


async def submit_job(
    ex: GpuExecutor, user: int, request: GenerationRequest
) -> tuple[Job, Timing, asyncio.Task[Timing]]:
    timing = Timing(submitted=time.perf_counter())
    job = await ex.submit(origin(user), request)
    return job, timing, asyncio.create_task(follow(job, timing))


@contextlib.asynccontextmanager
async def gpu_held(ex: GpuExecutor) -> AsyncIterator[None]:
    """Park the GPU thread so a queue can be built first; leaving the block lets it go."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait()

    held = asyncio.ensure_future(ex.run_on_gpu_thread(hold))
    await asyncio.to_thread(entered.wait)
    try:
        yield
    finally:
        gate.set()
        await held


def done_ok(timings: Sequence[Timing]) -> list[Timing]:
    failed = [t.error for t in timings if t.error]
    if failed:
        raise BenchError(f"{len(failed)} job(s) failed, e.g.: {failed[0]}")
    return list(timings)


# -- the measurements -----------------------------------------------------------------------


async def throughput_rounds(bench: Bench, ex: GpuExecutor) -> dict[str, float]:
    """Per round, side by side: the pipeline alone (4 solo calls vs one call of 4), then the
    executor with 16 jobs from 4 users one at a time, then micro-batched."""
    args = bench.args
    engine = bench.engine
    probe = [bench.request(90, i) for i in range(args.batch)]

    def pipeline_round() -> tuple[float, float]:
        started = time.perf_counter()
        for request in probe:
            engine.generate([request])
        solo = time.perf_counter() - started
        started = time.perf_counter()
        engine.generate(probe)
        return solo, time.perf_counter() - started

    async def executor_round(max_batch: int, round_no: int) -> float:
        ex.max_batch = max_batch
        async with gpu_held(ex):
            tasks = [
                await submit(ex, user, bench.request(user, 1000 * round_no + i))
                for i in range(args.jobs // args.users)
                for user in range(args.users)
            ]
            released = time.perf_counter()
        timings = done_ok(await asyncio.gather(*tasks))
        return max(t.finished or 0.0 for t in timings) - released

    pipe_solo, pipe_batch, one, batched = [], [], [], []
    started = time.perf_counter()
    for round_no in range(args.rounds):
        if round_no and time.perf_counter() - started > args.budget:
            log.warning("throughput: stopping after %d rounds (time budget)", round_no)
            break
        solo, batch = await ex.run_on_gpu_thread(pipeline_round)
        pipe_solo.append(solo)
        pipe_batch.append(batch)
        one.append(await executor_round(1, 2 * round_no))
        batched.append(await executor_round(args.batch, 2 * round_no + 1))
        log.info(
            "round %d: pipeline %.3f/%.3f s, executor %.3f/%.3f s",
            round_no,
            solo,
            batch,
            one[-1],
            batched[-1],
        )
    ex.max_batch = args.batch
    jobs = (args.jobs // args.users) * args.users
    # Best of the rounds, for all four alike: other load only ever adds time.
    return {
        "pipeline_speedup": min(pipe_solo) / min(pipe_batch),
        "one_s": min(one),
        "batched_s": min(batched),
        "jobs": jobs,
        "job_s": min(one) / jobs,
        "rounds": len(one),
    }


async def saturation(bench: Bench, ex: GpuExecutor) -> dict[str, Any]:
    """Keep every user's queue topped up for a while; sample GPU busy time and loop lag."""
    args = bench.args
    stop = asyncio.Event()
    current: dict[int, Job] = {}
    counter = itertools.count()
    first_done = asyncio.Event()

    async def slot(user: int, slot_no: int) -> None:
        while not stop.is_set():
            job = await ex.submit(origin(user), bench.request(user, 50_000 + next(counter)))
            current[slot_no] = job
            timing = await follow(job, Timing(time.perf_counter()))
            if timing.error and not stop.is_set():
                raise BenchError(f"a job failed under load: {timing.error}")
            first_done.set()

    lags: list[float] = []

    async def sample_lag() -> None:
        interval = 0.005
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(interval)
            lags.append(time.perf_counter() - started - interval)

    # Two batches' worth of jobs per user outstanding: the queue never runs dry.
    depth = 2 * args.batch
    slots = [
        asyncio.create_task(slot(user, user * depth + d))
        for user in range(args.users)
        for d in range(depth)
    ]
    await first_done.wait()  # past the warm-up
    sampler = asyncio.create_task(sample_lag())
    t0, busy0 = time.perf_counter(), ex.status().gpu_busy_s
    await asyncio.sleep(args.window)
    t1, busy1 = time.perf_counter(), ex.status().gpu_busy_s
    min_queue = ex.queue_length
    stop.set()
    await sampler
    for job in list(current.values()):
        await ex.cancel(job.id)
    await asyncio.gather(*slots)
    lags.sort()
    return {
        "busy_ratio": (busy1 - busy0) / (t1 - t0),
        "lag_p50_ms": 1000 * lags[len(lags) // 2],
        "lag_p99_ms": 1000 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
        "lag_samples": len(lags),
        "queue_at_end": min_queue,
    }


async def fairness(bench: Bench, ex: GpuExecutor, job_s: float) -> dict[str, float]:
    """A heavy user queues 20 jobs; mid-way through one, a light user asks for one job.

    Three trials; each measures its own job-time (the light job's run, on the same machine at
    the same moment), so a noisy neighbour does not skew the ratio. Also counted: heavy jobs
    that started after the light job was queued but before it (FIFO: all of them).
    """
    args = bench.args
    heavy_user, light_user = 1, 2
    ex.max_batch = 1  # one job per call, so "job-times" are plain jobs
    waits: list[float] = []
    ahead: list[int] = []
    positions: list[int] = []
    for trial in range(3):
        async with gpu_held(ex):
            heavy = [
                await submit_job(
                    ex, heavy_user, bench.request(heavy_user, 70_000 + 100 * trial + i)
                )
                for i in range(args.heavy)
            ]
        first = heavy[0][1]
        while first.started is None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(job_s / 2)  # arrive in the middle of a heavy job
        light_job, light, light_task = await submit_job(
            ex, light_user, bench.request(light_user, 71_000 + trial)
        )
        positions.append(ex.positions().get(light_job.id, 0))
        await light_task
        if light.error or light.started is None or light.finished is None:
            raise BenchError(f"the light user's job failed: {light.error}")
        # The light job's own run is the job-time: from its start to the next start.
        after = [t for _, t, _ in heavy if t.started is not None and t.started > light.started]
        while not after:
            await asyncio.sleep(0.001)
            after = [t for _, t, _ in heavy if t.started and t.started > light.started]
        job_time = min(t.started for t in after if t.started) - light.started
        waits.append((light.started - light.submitted) / job_time)
        ahead.append(
            sum(
                1
                for _, t, _ in heavy
                if t.started is not None and light.submitted < t.started < light.started
            )
        )
        for job, _, _ in heavy:
            await ex.cancel(job.id)
        await asyncio.gather(*(task for _, _, task in heavy))
    ex.max_batch = args.batch
    return {
        "wait_jobs": statistics.median(waits),
        "worst_jobs": max(waits),
        "ahead": float(max(ahead)),
        "position": float(max(positions)),
    }


def memory_snapshot() -> dict[str, float]:
    """Bytes of model weights resident (unique tensors across every live pipeline: shared
    components count once) plus the process's own figure (CUDA allocated, or RSS)."""
    import torch
    from diffusers import DiffusionPipeline

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns
        warnings.simplefilter("ignore")
        pipes = [o for o in gc.get_objects() if isinstance(o, DiffusionPipeline)]
    seen: set[tuple[str, int]] = set()
    weights = 0
    for pipe in pipes:
        for component in getattr(pipe, "components", {}).values():
            if not isinstance(component, torch.nn.Module):
                continue
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                storage = tensor.untyped_storage()
                key = (str(storage.device), storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    weights += storage.nbytes()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        process, kind = float(torch.cuda.memory_allocated()), "CUDA allocated"
    else:
        with open("/proc/self/statm") as f:
            process, kind = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")), "RSS"
    return {
        "weights": float(weights),
        "pipelines": float(len(pipes)),
        "process": process,
        "kind_is_cuda": float(kind == "CUDA allocated"),
    }


async def memory(bench: Bench, ex: GpuExecutor) -> dict[str, Any]:
    size = bench.args.size
    init = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    alone = await ex.run_on_gpu_thread(memory_snapshot)
    tasks = [
        await submit(ex, 5, bench.request(5, 1, mode="img2img", init_image=init, strength=0.6)),
        await submit(
            ex,
            5,
            bench.request(5, 2, mode="inpaint", init_image=init, mask_image=mask, strength=0.9),
        ),
    ]
    timings = await asyncio.gather(*tasks)
    errors = [t.error for t in timings if t.error]
    if errors:
        return {"error": errors[0]}
    three = await ex.run_on_gpu_thread(memory_snapshot)
    return {"alone": alone, "three": three}


# -- the run --------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


async def run(args: argparse.Namespace) -> tuple[list[Row], str]:
    from bot.engine import Engine  # torch and diffusers take seconds to import

    say = print if args.verbose else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(prefix="sdbot-bench-") as tmp:
        db = await Database.open(Path(tmp) / "bench.db")
        try:
            exact = {"auto": None, "on": True, "off": False}[args.exact_batches]
            engine = Engine(
                device=args.device,
                dtype=args.dtype,
                cache_dir=args.cache_dir,
                exact_batches=exact,
            )
            where = (
                f"{engine.device} ({str(engine.dtype).removeprefix('torch.')}, "
                f"exact_batches={engine.exact_batches})"
            )
            bench = Bench(args, engine, db)
            rows: list[Row] = []
            async with bench.executor() as ex:
                print("loading the model and warming up…", file=sys.stderr)
                await ex.preload(args.model)
                warm = [bench.request(91, i) for i in range(args.batch)]
                await ex.run_on_gpu_thread(
                    lambda: (engine.generate(warm[:1]), engine.generate(warm))
                )

                print("throughput: pipeline and executor, side by side…", file=sys.stderr)
                tp = await throughput_rounds(bench, ex)
                say(tp)
                print(f"saturating the executor for {args.window:g}s…", file=sys.stderr)
                sat = await saturation(bench, ex)
                say(sat)
                print("fairness: a light user behind a heavy one…", file=sys.stderr)
                fair = await fairness(bench, ex, tp["job_s"])
                say(fair)
                print("memory: txt2img alone, then all three modes…", file=sys.stderr)
                mem = await memory(bench, ex)
                say(mem)

            exec_speedup = tp["one_s"] / tp["batched_s"]
            share = exec_speedup / tp["pipeline_speedup"]
            rows += [
                Row(
                    "GPU-thread busy / wall, saturated",
                    f"{sat['busy_ratio']:.3f}",
                    ">= 0.97",
                    sat["busy_ratio"] >= 0.97,
                    f"{args.window:g}s window",
                ),
                Row(
                    f"{tp['jobs']:.0f} jobs / {args.users} users, one at a time",
                    f"{tp['jobs'] / tp['one_s']:.2f} jobs/s",
                    note=f"{tp['one_s']:.2f}s",
                ),
                Row(
                    f"{tp['jobs']:.0f} jobs / {args.users} users, micro-batched (max {args.batch})",
                    f"{tp['jobs'] / tp['batched_s']:.2f} jobs/s",
                    note=f"{tp['batched_s']:.2f}s",
                ),
                Row(
                    "  executor speed-up",
                    f"{exec_speedup:.2f}x",
                    note=f"best of {tp['rounds']} rounds",
                ),
                Row(
                    f"  pipeline batch-of-{args.batch} speed-up, same rounds",
                    f"{tp['pipeline_speedup']:.2f}x",
                ),
                Row("  executor / pipeline speed-up", f"{share:.2f}", ">= 0.9", share >= 0.9),
                Row(
                    "event-loop lag p50 / p99, saturated",
                    f"{sat['lag_p50_ms']:.2f} / {sat['lag_p99_ms']:.2f} ms",
                    "p99 < 10 ms",
                    sat["lag_p99_ms"] < 10,
                    f"{sat['lag_samples']} samples",
                ),
                Row(
                    f"light user's wait behind {args.heavy} queued jobs",
                    f"{fair['wait_jobs']:.2f} job-times",
                    "<= 2",
                    fair["wait_jobs"] <= 2,
                    f"median of 3, worst {fair['worst_jobs']:.2f}; queued at "
                    f"#{fair['position']:.0f}, {fair['ahead']:.0f} heavy jobs went first "
                    f"(FIFO: {args.heavy})",
                ),
            ]
            if "error" in mem:
                rows.append(Row("memory, 3 modes / txt2img", "n/a", "<= 1.05", None, mem["error"]))
            else:
                alone, three = mem["alone"], mem["three"]
                ratio = three["weights"] / alone["weights"]
                kind = "CUDA allocated" if three["kind_is_cuda"] else "process RSS"
                rows += [
                    Row(
                        "model weights, 3 modes / txt2img",
                        f"{ratio:.3f}",
                        "<= 1.05",
                        ratio <= 1.05,
                        f"{_mb(three['weights'])} in "
                        f"{three['pipelines']:.0f} pipelines vs {_mb(alone['weights'])}",
                    ),
                    Row(
                        f"{kind}, 3 modes / txt2img",
                        f"{three['process'] / alone['process']:.3f}",
                        note=f"{_mb(three['process'])} vs {_mb(alone['process'])}",
                    ),
                ]
            return rows, where
        finally:
            await db.close()


def render(rows: Sequence[Row], header: str) -> str:
    table = [("metric", "measured", "target", "ok", "note")] + [
        (r.metric, r.measured, r.target, {True: "yes", False: "NO", None: ""}[r.ok], r.note)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    lines = [header, ""]
    for n, line in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sdbot bench", description="Measure the GPU executor (issue 4's figures)."
    )
    p.add_argument("--model", default="builtin:tiny", help="model source (default: builtin:tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--size", type=int, default=None, help="image size (default: model's)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per job (default: 8)")
    p.add_argument("--batch", type=int, default=4, help="max_batch to compare (default: 4)")
    p.add_argument("--jobs", type=int, default=16, help="jobs per throughput run (default: 16)")
    p.add_argument("--users", type=int, default=4, help="users sharing them (default: 4)")
    p.add_argument("--heavy", type=int, default=20, help="heavy user's queue (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (default: 3)")
    p.add_argument(
        "--budget", type=float, default=90.0, help="no new throughput round after this (s)"
    )
    p.add_argument("--window", type=float, default=10.0, help="saturation seconds (default: 10)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("data/cache"),
        help="where models are cached / the tiny model is built (default: data/cache)",
    )
    p.add_argument(
        "--exact-batches",
        choices=("auto", "on", "off"),
        default="auto",
        help="the engine's bit-exact batching (auto: on except on CUDA)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = native_size(args.model)
    return args


def native_size(model: str) -> int:
    """The square size `model` (a name in the shipped catalog, or a source) was trained at."""
    try:
        # The LoRA folder plays no part in native sizes; any path will do.
        return Catalog.load(None, Path("data/loras")).resolve(model).native_size
    except InvalidRequest:
        return probe_native_size(model)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sdbot bench` (argv without the subcommand) and `python -m`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    started = time.perf_counter()
    try:
        rows, where = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    import torch

    header = (
        f"sdbot bench: {args.model} on {where}, {args.size}x{args.size}, "
        f"{args.steps} steps, max_batch {args.batch}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.1f}; took {time.perf_counter() - started:.0f}s"
    )
    print(render(rows, header))
    missed = [r.metric for r in rows if r.ok is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
