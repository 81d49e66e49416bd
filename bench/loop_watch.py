"""Event-loop lag, measured from inside the loop, and what the loop was doing meanwhile.

The lag is how late a 10 ms sleep wakes up: what a gateway heartbeat or a member's command
waits behind. It counts everything that holds the loop up, including waits for the GIL and for
a free core, so on a busy machine it says as much about the machine as about the code.

So every callback the loop runs is also timed in CPU time, less garbage collection: that is
the code's own work, whatever else the machine does (a callback whose wall time is mostly not
CPU time was waiting, not working). Garbage-collector pauses are timed on their own, in any
thread: whichever thread collects holds the GIL, so the loop waits on every one. With
`stacks`, a sampler thread also records where slow callbacks were; it competes for the GIL,
so take the lag figures from a run without it. (asyncio's debug mode names slow callbacks
too, but not where inside them the time went, and it slows every coroutine down.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType, TracebackType
from typing import Any

ROOT = str(Path(__file__).resolve().parent.parent) + "/"
#: Frames of the event loop's own machinery say nothing about who was slow.
BORING = ("asyncio/", "contextlib.py", "bench/loop_watch.py")
_TIMED_RUN_CODE: CodeType | None = None


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SlowCallback:
    what: str
    start: float
    wall: float
    #: CPU time of the loop thread, less garbage collection in it.
    cpu: float
    stacks: list[tuple[str, ...]] = field(default_factory=list)


@dataclass
class GcPause:
    start: float
    seconds: float
    generation: int
    on_loop: bool


class LoopWatch:
    """`async with LoopWatch(): ...` watches the running loop while inside."""

    def __init__(self, *, stacks: bool = False, interval: float = 0.01, slow: float = 0.005):
        self.stacks = stacks
        self.interval = interval
        self.slow = slow
        self.lag_ms: list[float] = []
        #: Per lag sample, how long the loop thread was runnable but waited for a core.
        self.core_wait_ms: list[float] = []
        #: (start, end) of each lag sample over `slow`, to tell which callbacks explain it.
        self.spikes: list[tuple[float, float]] = []
        self.slow_callbacks: list[SlowCallback] = []
        self.heaviest: SlowCallback | None = None
        self.busy: dict[str, float] = defaultdict(float)
        self.gc_pauses: list[GcPause] = []
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._sampler: threading.Thread | None = None
        self._thread_id = 0
        self._current: tuple[float, list[tuple[str, ...]]] | None = None
        self._orig_run: Callable[[asyncio.Handle], None] | None = None
        self._gc_start = self._gc_cpu_start = 0.0
        #: CPU time the loop thread spent collecting garbage, so far.
        self._loop_gc = 0.0

    @property
    def max_cpu_ms(self) -> float:
        return self.heaviest.cpu * 1000 if self.heaviest else 0.0

    async def __aenter__(self) -> LoopWatch:
        self._thread_id = threading.get_ident()
        self._install()
        self._task = asyncio.create_task(self._monitor())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self._uninstall()

    async def _monitor(self) -> None:
        queued = _RunQueueClock()
        try:
            while not self._stop.is_set():
                start, q0 = time.perf_counter(), queued.seconds()
                await asyncio.sleep(self.interval)
                end, q1 = time.perf_counter(), queued.seconds()
                late = end - start - self.interval
                self.lag_ms.append(late * 1000)
                if q0 is not None and q1 is not None:
                    self.core_wait_ms.append(min(max(q1 - q0, 0.0), max(late, 0.0)) * 1000)
                if late > self.slow:
                    self.spikes.append((start, end))
        finally:
            queued.close()

    @property
    def lag_less_core_wait_ms(self) -> list[float]:
        """The lag less the time the loop thread was ready but had no core: what the loop
        waited on inside the process (its own work, the GIL, GC). Empty off Linux."""
        if len(self.core_wait_ms) != len(self.lag_ms):
            return []
        return [lag - wait for lag, wait in zip(self.lag_ms, self.core_wait_ms, strict=True)]

    # -- timing callbacks ----------------------------------------------------------------------

    def _install(self) -> None:
        global _TIMED_RUN_CODE
        orig = asyncio.events.Handle._run
        self._orig_run = orig
        watch = self

        def timed_run(handle: asyncio.Handle) -> None:
            if threading.get_ident() != watch._thread_id:
                return orig(handle)
            samples: list[tuple[str, ...]] = []
            t0, c0, g0 = time.perf_counter(), time.thread_time(), watch._loop_gc
            watch._current = (t0, samples)
            try:
                return orig(handle)
            finally:
                watch._current = None
                wall = time.perf_counter() - t0
                what = describe(handle)
                watch.busy[what] += wall
                cpu = time.thread_time() - c0 - (watch._loop_gc - g0)
                record = None
                if wall > watch.slow or cpu > watch.slow:
                    record = SlowCallback(what, t0, wall, cpu, samples)
                    watch.slow_callbacks.append(record)
                if watch.heaviest is None or cpu > watch.heaviest.cpu:
                    watch.heaviest = record or SlowCallback(what, t0, wall, cpu, samples)

        _TIMED_RUN_CODE = timed_run.__code__
        setattr(asyncio.events.Handle, "_run", timed_run)  # noqa: B010 (mypy: a method)
        gc.callbacks.append(self._on_gc)
        if self.stacks:
            self._sampler = threading.Thread(target=self._sample, name="loop-watch", daemon=True)
            self._sampler.start()

    def _uninstall(self) -> None:
        if self._orig_run is not None:
            setattr(asyncio.events.Handle, "_run", self._orig_run)  # noqa: B010
        gc.callbacks.remove(self._on_gc)
        if self._sampler is not None:
            self._sampler.join()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        on_loop = threading.get_ident() == self._thread_id
        if phase == "start":
            self._gc_start, self._gc_cpu_start = time.perf_counter(), time.thread_time()
            return
        seconds = time.perf_counter() - self._gc_start
        if on_loop:
            self._loop_gc += time.thread_time() - self._gc_cpu_start
        self.gc_pauses.append(GcPause(self._gc_start, seconds, info["generation"], on_loop))

    def _sample(self) -> None:
        """Every 2 ms (or whenever the GIL lets it), the stack of a long callback."""
        while not self._stop.wait(0.002):
            current = self._current
            if current is None or time.perf_counter() - current[0] < self.slow / 2:
                continue
            frame = sys._current_frames().get(self._thread_id)
            if frame is not None:
                current[1].append(_stack(frame))

    # -- the report ----------------------------------------------------------------------------

    def details(self, top: int = 10) -> str:
        slow = self.slow_callbacks
        ms = self.slow * 1000
        pauses = [p.seconds for p in self.gc_pauses]
        lines = [
            f"\nbot loop: {len(self.lag_ms)} lag samples, {len(self.spikes)} over {ms:g} ms, "
            f"{self._explained()} of those during a slow callback or a GC pause (the rest: "
            "the loop thread waited for the GIL or a core between callbacks)",
            f"callbacks over {ms:g} ms: {len(slow)}, {sum(s.wall for s in slow) * 1000:.0f} ms "
            f"wall, of which CPU {sum(s.cpu for s in slow) * 1000:.0f} ms",
            f"GC pauses (any thread): {len(pauses)}, {sum(pauses) * 1000:.0f} ms in all, max "
            f"{max(pauses, default=0) * 1000:.1f} ms, {sum(1 for d in pauses if d > self.slow)} "
            f"over {ms:g} ms; gen 2: {sum(1 for p in self.gc_pauses if p.generation == 2)}",
            "\nslow callbacks by what ran: count, wall ms, CPU ms, max wall ms, max CPU ms",
        ]
        by_what: dict[str, list[SlowCallback]] = defaultdict(list)
        for s in slow:
            by_what[s.what].append(s)
        ranked = sorted(by_what.items(), key=lambda kv: -sum(s.wall for s in kv[1]))
        for what, group in ranked[:top]:
            wall, cpu = sum(s.wall for s in group) * 1000, sum(s.cpu for s in group) * 1000
            worst, heavy = max(s.wall for s in group) * 1000, max(s.cpu for s in group) * 1000
            lines.append(f"  {len(group):>5} {wall:>7.0f} {cpu:>6.0f} {worst:>6.1f} {heavy:>6.1f}"
                         f"  {what}")  # fmt: skip
        if self.stacks:
            lines.append("\nwhere slow callbacks were (sampled stacks, ms of wall time):")
            per_stack: dict[tuple[str, ...], float] = defaultdict(float)
            for s in slow:
                for stack in s.stacks:
                    per_stack[stack] += s.wall * 1000 / len(s.stacks)
            for stack, spent in sorted(per_stack.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {spent:>6.0f}  " + "\n          <- ".join(stack or ("?",)))
        lines.append("\nheaviest callbacks (CPU ms less GC, wall ms), where sampled:")
        for s in sorted(slow, key=lambda s: -s.cpu)[:5]:
            where = "\n          <- ".join(s.stacks[len(s.stacks) // 2]) if s.stacks else "-"
            lines.append(
                f"  {s.cpu * 1000:>6.1f} {s.wall * 1000:>6.1f}  {s.what}\n          {where}"
            )
        lines.append("\nloop time by callback (wall ms):")
        for what, secs in sorted(self.busy.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {secs * 1000:>7.0f}  {what}")
        return "\n".join(lines)

    def _explained(self) -> int:
        busy = [(s.start, s.start + s.wall) for s in self.slow_callbacks]
        busy += [(p.start, p.start + p.seconds) for p in self.gc_pauses if p.seconds > 0.001]
        return sum(1 for a, b in self.spikes if any(s < b and e > a for s, e in busy))


class _RunQueueClock:
    """The calling thread's time spent runnable but waiting for a core (Linux schedstat)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def seconds(self) -> float | None:
        if self._fd is None:
            return None
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def describe(handle: asyncio.Handle) -> str:
    """A callback by what it runs: a task by its coroutine, else the function."""
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        code = getattr(coro, "cr_code", None)
        where = _short(code.co_filename) if code is not None else "?"
        return f"task {getattr(coro, '__qualname__', coro)!s} ({where})"
    name = getattr(callback, "__qualname__", None) or type(callback).__qualname__
    return str(name)


def _short(filename: str) -> str:
    marker = "site-packages/"
    if marker in filename:
        return filename.split(marker, 1)[1]
    return filename[len(ROOT) :] if filename.startswith(ROOT) else filename.rsplit("/", 2)[-1]


def _stack(frame: FrameType | None, depth: int = 8) -> tuple[str, ...]:
    out: list[str] = []
    while frame is not None and len(out) < depth:
        if frame.f_code is _TIMED_RUN_CODE:
            break  # below it, only the loop's own machinery
        if not any(b in frame.f_code.co_filename for b in BORING):
            out.append(
                f"{_short(frame.f_code.co_filename)}:{frame.f_code.co_name}:{frame.f_lineno}"
            )
        frame = frame.f_back
    return tuple(out)
