"""A stand-in for a GPU, for the load bench: the engine contract, with each diffusion step a
sleep (the GIL released, as while CUDA computes) and noise images of the requested size.

Without a GPU the tiny model computes on the CPU: its thread takes a core, and the GIL for
diffusers' Python, as a GPU deployment's would not, so the load bench's loop lag then says more
about the machine than about the bot. With this engine everything but the diffusion is real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bot.backend import GenerationResult, StepInfoLike
from bot.jobs import GenerationRequest


@dataclass(frozen=True)
class Step:
    step: int
    total: int
    preview: Callable[[int], Image.Image]


class StandInEngine:
    def __init__(self, step_seconds: float = 0.03) -> None:
        self.step_seconds = step_seconds
        self.loaded_models: list[str] = []
        self.on_load: Callable[..., object] | None = None  # the runner sets it; nothing loads

    def load(self, model: str) -> None:
        self.loaded_models = [model]

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> list[GenerationResult]:
        self.load(requests[0].model)
        total = requests[0].steps
        for step in range(1, total + 1):
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(Step(step, total, lambda i: Image.new("RGB", (64, 64))))
        return [
            GenerationResult(
                images=[_noise(r.width, r.height, seed) for seed in r.seeds],
                seeds=list(r.seeds),
                nsfw=[False] * len(r.seeds),
                sampler="Euler",
            )
            for r in requests
        ]


def _noise(width: int, height: int, seed: int) -> Image.Image:
    # Noise, as a model's first steps are: it compresses as badly as a PNG can.
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
