"""The sections of `sdbot bench gpu`: each measures one thing and returns its table rows.

A section raises to report an error (the runner prints it in the section's row and goes on);
`NotHere` says a row cannot be measured on this machine (no CUDA, no SDXL), printed as
"n/a (...)". Everything runs on the bot's Engine (and, for OOM recovery, its executor), so the
figures are the bot's, not a bare diffusers loop's.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.gpu_measure import allocated_mb, best_rate, denoise_rate, timed
from bench.gpu_models import native_size, write_model
from bot.backend import Finished, JobOrigin
from bot.engine import Engine
from bot.errors import GenerationFailed
from bot.jobs import GenerationRequest

#: Published SD 1.5 512 px figures on an A100 (diffusers' torch.compile docs): it/s.
A100 = {"eager 1": "21.7", "eager 4": "11.6", "compiled 1": "44.0", "compiled 4": "14.6"}


class NotHere(Exception):
    """This row cannot be measured on this machine; the message says why."""


@dataclass(frozen=True)
class Row:
    name: str
    ours: str
    anchor: str = ""


@dataclass
class Bench:
    """What the sections share: the device, the shapes, the models built, the clock."""

    device: torch.device
    scale: str
    folder: Path
    deadline: float
    steps: int
    repeats: int
    exact_batch: int
    models: dict[str, Path] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float) -> None:
        if self.left() < seconds:
            raise NotHere(f"time guard: {self.left():.0f} s left, needs about {seconds:.0f} s")

    def skipped(self, name: str, seconds: float) -> Row | None:
        """An n/a row for `name` when `seconds` do not fit; for a section's later rows, so a
        time guard there does not cost the rows it measured already."""
        try:
            self.need(seconds)
        except NotHere as why:
            return Row(name, f"n/a ({why})")
        return None

    def cuda(self) -> None:
        if self.device.type != "cuda":
            raise NotHere("no CUDA")

    def model(self, family: str) -> str:
        if family not in self.models:
            raise NotHere(f"{family} not built")
        return str(self.models[family])

    def engine(self, **options: Any) -> Engine:
        return Engine(device=str(self.device), cache_dir=self.folder / "cache", **options)

    def size(self, family: str = "sd15") -> int:
        return native_size(family, self.scale)

    def requests(
        self, images: int, *, family: str = "sd15", size: int | None = None, steps: int = 0
    ) -> list[GenerationRequest]:
        """`images` images in requests of at most 4 (the per-request cap), one batch key."""
        side = size or self.size(family)
        out: list[GenerationRequest] = []
        seed = 1
        while images > 0:
            count = min(4, images)
            out.append(
                GenerationRequest(
                    prompt="a photo of a red fox in the snow",
                    model=self.model(family),
                    width=side,
                    height=side,
                    steps=steps or self.steps,
                    seed=seed,
                    count=count,
                    scheduler="Euler",
                )
            )
            seed += count
            images -= count
        return out

    def rate(self, engine: Engine, images: int, **kw: Any) -> float:
        return best_rate(engine, lambda: self.requests(images, **kw), self.repeats)


def _mb(value: float) -> str:
    return f"{value:+.0f} MB"


def _build(bench: Bench, family: str, label: str) -> Row:
    seconds, _ = timed(
        lambda: write_model(family, bench.scale, bench.folder / family, device=bench.device)
    )
    bench.models[family] = bench.folder / family
    return Row(f"build random {label} ({bench.scale})", f"{seconds:.1f} s")


def build(bench: Bench) -> list[Row]:
    return [_build(bench, "sd15", "SD 1.5")]


def eager(bench: Bench) -> list[Row]:
    engine = bench.engine()
    size = bench.size()
    rows: list[Row] = []
    for images in (1, 4, 8):
        name = f"SD 1.5 {size}px batch {images} eager ({engine.dtype})"
        skip = bench.skipped(name, 10)
        if skip is not None:
            return [*rows, skip]
        rate = bench.rate(engine, images)
        anchor = A100.get(f"eager {images}", "")
        rows.append(Row(name, f"{rate:.2f} it/s", f"A100: {anchor} it/s" if anchor else ""))
    return rows


def dtypes(bench: Bench) -> list[Row]:
    bench.cuda()
    out = []
    for dtype in ("bfloat16", "float16"):
        bench.need(20)
        engine = bench.engine(dtype=dtype)
        out.append(f"{dtype}: {bench.rate(engine, 1):.2f}")
        engine.unload()
    return [Row(f"SD 1.5 {bench.size()}px batch 1, bf16 vs fp16", " / ".join(out) + " it/s")]


def syncs(bench: Bench) -> list[Row]:
    bench.cuda()
    rows: list[Row] = []
    for exact in (False, True):
        label = "exact batches" if exact else "batched"
        name = f"host syncs per denoising step (batch 2, {label})"
        skip = bench.skipped(name, 20)
        if skip is not None:
            return [*rows, skip]
        engine = bench.engine(exact_batches=exact)
        engine.generate(bench.requests(2))
        clock = denoise_rate(engine, bench.requests(2), count_syncs=True)
        per_step = clock.syncs / max(1, clock.total - 1)
        rows.append(Row(name, f"{per_step:.2f}"))
        engine.unload()
    return rows


def exact_cost(bench: Bench) -> list[Row]:
    images = bench.exact_batch
    rates = {}
    for exact in (True, False):
        bench.need(15)
        engine = bench.engine(exact_batches=exact)
        rates[exact] = bench.rate(engine, images)
        engine.unload()
    cost = 100.0 * (rates[False] / rates[True] - 1.0) if rates[True] > 0 else float("nan")
    return [
        Row(
            f"exact batches, batch {images} ({bench.device.type})",
            f"on {rates[True]:.3f} / off {rates[False]:.3f} it/s ({cost:+.0f}% time with it on)",
        )
    ]


def memory(bench: Bench) -> list[Row]:
    bench.cuda()
    engine = bench.engine()
    engine.unload()
    base = allocated_mb(engine)
    engine.generate(bench.requests(1))
    loaded = allocated_mb(engine)
    engine.unload()
    after_evict = allocated_mb(engine)
    engine.generate(bench.requests(1))
    before_fail = allocated_mb(engine)

    def fail(info: Any) -> None:
        if info.step == 2:
            raise RuntimeError("injected failure (bench)")

    failed = False
    try:
        engine.generate(bench.requests(4), on_step=fail)
    except GenerationFailed:
        failed = True
    after_fail = allocated_mb(engine)
    engine.unload()
    return [
        Row(
            "allocated after an eviction, vs before the load",
            f"{_mb(after_evict - base)} (model took {loaded - base:.0f} MB)",
        ),
        Row(
            "allocated after a failed job, vs before it",
            _mb(after_fail - before_fail) if failed else "the injected failure did not fail",
        ),
    ]


def oom(bench: Bench) -> list[Row]:
    bench.cuda()
    bench.need(40)
    engine = bench.engine()
    engine.generate(bench.requests(1))
    total = torch.cuda.get_device_properties(bench.device).total_memory
    # The model and about one 1024 px image's working memory: 8 at once cannot fit.
    cap = torch.cuda.memory_allocated(bench.device) + 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), bench.device)
    try:
        seconds, outcome = timed(lambda: asyncio.run(_oom_jobs(bench, engine)))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, bench.device)
        engine.unload()
    return [
        Row(
            f"OOM recovery: 8 x 1024px under a {cap / 2**30:.0f} GiB cap",
            outcome + f", {seconds:.0f} s",
        )
    ]


async def _oom_jobs(bench: Bench, engine: Engine) -> str:
    from bot.db import Database  # the bench's own throwaway database
    from bot.executor import GpuExecutor

    db = await Database.open(bench.folder / "oom.db")
    executor = GpuExecutor(engine, db, max_batch=8, user_queue_limit=4)
    await executor.start()
    recoveries = _Recoveries()
    logging.getLogger("bot").addHandler(recoveries)
    try:
        origin = JobOrigin(user_id=1, user_name="bench", guild_id=1, channel_id=1, command="bench")
        jobs = [
            await executor.submit(origin, request)
            for request in bench.requests(8, size=1024, steps=min(bench.steps, 4))
        ]
        ends = [[e async for e in job.stream()][-1] for job in jobs]
    finally:
        logging.getLogger("bot").removeHandler(recoveries)
        await executor.close()
        await db.close()
    done = sum(isinstance(end, Finished) for end in ends)
    outcome = f"{done}/{len(jobs)} jobs finished ({recoveries})"
    if done == len(jobs):
        return outcome
    failures = {str(getattr(getattr(end, "error", None), "message", end))[:120] for end in ends}
    return f"{outcome}; {'; '.join(sorted(failures))}"


class _Recoveries(logging.Handler):
    """Counts the bot's out-of-memory recoveries by their log lines: whether the cap bit."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.splits = self.tiled = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.splits += "retrying in halves" in message
        self.tiled += "decoding again in tiles" in message

    def __str__(self) -> str:
        return f"{self.splits} batch splits, {self.tiled} tiled decodes"


def switch(bench: Bench) -> list[Row]:
    bench.need(30)
    first = Path(bench.model("sd15"))
    second = bench.folder / "sd15-copy"
    if not second.exists():
        shutil.copytree(first, second)
    rows = []
    for label, budget in (("from disk", 0), ("RAM tier", 64_000)):
        engine = bench.engine(max_loaded=1, ram_cache_mb=budget)
        engine.load(str(first))
        engine.load(str(second))
        # Back and forth: the first switch back pins RAM for the model it evicts, later
        # ones reuse the pinned blocks the other model left.
        times = [_load_time(engine, model) for model in (first, second) * 2]
        engine.unload()
        rows.append(
            Row(
                f"model switch back and forth ({label}), one model loaded",
                f"first {times[0]:.2f} s, then {sum(times[1:]) / 3:.2f} s",
            )
        )
    return rows


def _load_time(engine: Engine, model: Path) -> float:
    return timed(lambda: engine.load(str(model)))[0]


def compiled(bench: Bench) -> list[Row]:
    bench.cuda()
    bench.need(100)
    engine = bench.engine(compile=True)
    size = bench.size()
    rows: list[Row] = []
    compile_s = 0.0
    for images in (1, 4):
        name = f"SD 1.5 {size}px batch {images} compiled"
        # Batch 4 is a new graph: about as long to compile as the first one was.
        skip = bench.skipped(name, 1.3 * compile_s) if images == 4 else None
        if skip is not None:
            return [*rows, skip]
        compile_s, _ = timed(lambda images=images: engine.generate(bench.requests(images)))  # type: ignore[misc]
        rate = max(denoise_rate(engine, bench.requests(images)).rate for _ in range(bench.repeats))
        anchor = A100[f"compiled {images}"]
        rows.append(
            Row(
                name,
                f"{rate:.2f} it/s (first call {compile_s:.0f} s)",
                f"A100: {A100[f'eager {images}']} -> {anchor} it/s",
            )
        )
    return rows


def sdxl(bench: Bench) -> list[Row]:
    # Built here, not with SD 1.5: when time is short this section may be skipped, and then
    # the minute its build takes is not spent either.
    bench.need(60)
    rows = [_build(bench, "sdxl", "SDXL")]
    engine = bench.engine()
    size = bench.size("sdxl")
    try:
        rate = bench.rate(engine, 1, family="sdxl")
    finally:
        engine.unload()
    rows.append(Row(f"SDXL {size}px batch 1 eager ({engine.dtype})", f"{rate:.2f} it/s"))
    return rows


#: Sections in the order they run: the cheap and important first, compile last. Inductor's
#: cold compiles can take minutes on a GPU: run earlier, they would eat the time guard of every
#: row after them; last, every other row is printed before compile starts, and a run stopped
#: during it (watchdog, or the caller's timeout) has already shown them.
SECTIONS: dict[str, Callable[[Bench], list[Row]]] = {
    "build": build,
    "eager": eager,
    "syncs": syncs,
    "exact": exact_cost,
    "memory": memory,
    "oom": oom,
    "dtype": dtypes,
    "switch": switch,
    "sdxl": sdxl,
    "compile": compiled,
}
