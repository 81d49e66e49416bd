"""Measuring tools for `sdbot bench gpu`: denoising it/s, host syncs per step, memory.

Timing on a GPU: the host queues kernels ahead of the device, so a step's callback time says
when the step was queued, not when it ran. `denoise_rate` synchronises once at the first
step's callback and once at the last (nowhere else), so the interval is the device's time for
the steps in between.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bot.jobs import GenerationRequest


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepClock:
    """An on_step callback noting the time of the first and the last step (synchronised)."""

    device: torch.device
    count_syncs: bool = False
    first: float = 0.0
    last: float = 0.0
    steps: int = 0
    total: int = 0
    syncs: int = 0
    _caught: list[warnings.WarningMessage] = field(default_factory=list)

    def __call__(self, info: Any) -> None:
        self.steps += 1
        self.total = int(info.total)
        if info.step == 1:
            sync(self.device)
            self.first = time.perf_counter()
            if self.count_syncs and self.device.type == "cuda":
                # From here to the last step every blocking copy or sync warns once.
                torch.cuda.set_sync_debug_mode("warn")
        elif info.step == info.total:
            if self.count_syncs and self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            sync(self.device)
            self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        """Steps per second between the first and the last step."""
        span = self.last - self.first
        return (self.total - 1) / span if span > 0 and self.total > 1 else float("nan")


def denoise_rate(
    engine: Any, requests: list[GenerationRequest], *, count_syncs: bool = False
) -> StepClock:
    """One generate() of `requests` on `engine`, timed per step (see the module docstring)."""
    clock = StepClock(engine.device, count_syncs=count_syncs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            engine.generate(requests, on_step=clock)
        finally:
            if count_syncs and engine.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    clock.syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return clock


def best_rate(engine: Any, make: Callable[[], list[GenerationRequest]], repeats: int) -> float:
    """The best of `repeats` timed runs, after one untimed warm-up run."""
    engine.generate(make())
    return max(denoise_rate(engine, make()).rate for _ in range(max(1, repeats)))


def allocated_mb(engine: Any) -> float:
    """Memory torch's allocator holds for tensors on the engine's device (MB)."""
    stats = getattr(engine, "memory_stats", None)
    if callable(stats):
        return float(stats()["allocated_mb"])
    return torch.cuda.memory_allocated(engine.device) / 2**20


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `fn` takes, with the device work it queued (asynchronous copies) finished."""
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out
