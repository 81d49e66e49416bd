"""The validated generation request: one frozen dataclass, checked in one place."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from bot.errors import InvalidRequest

MIN_SIZE = 64
MAX_SIZE = 1024
MIN_STEPS = 1
MAX_STEPS = 150
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def snap_to_8(value: int) -> int:
    """Latents are 1/8 of the image, so sizes must be multiples of 8; round down."""
    return value - value % 8


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the engine needs to make an image. Built once, validated once, never edited."""

    prompt: str
    model: str
    width: int
    height: int
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    seed: int = field(default_factory=new_seed)

    def __post_init__(self) -> None:
        check_inputs(self)

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
        }


def check_inputs(req: GenerationRequest) -> None:
    """Raise InvalidRequest naming the first bad value and what is allowed."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InvalidRequest(
            "The prompt is empty. Describe the image you want, e.g. `a red fox in snow`."
        )
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"The prompt is {len(req.prompt)} characters long; the limit is {MAX_PROMPT_CHARS}."
        )
    if len(req.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"The negative prompt is {len(req.negative_prompt)} characters long; "
            f"the limit is {MAX_PROMPT_CHARS}."
        )
    if not req.model:
        raise InvalidRequest("No model was given.")
    for name, value in (("width", req.width), ("height", req.height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{name} must be a whole number of pixels, got {value!r}.")
        if not MIN_SIZE <= value <= MAX_SIZE:
            raise InvalidRequest(
                f"{name} {value} is out of range; use {MIN_SIZE} to {MAX_SIZE} pixels."
            )
        if value % 8:
            raise InvalidRequest(f"{name} {value} is not a multiple of 8; try {snap_to_8(value)}.")
    if isinstance(req.steps, bool) or not isinstance(req.steps, int):
        raise InvalidRequest(f"steps must be a whole number, got {req.steps!r}.")
    if not MIN_STEPS <= req.steps <= MAX_STEPS:
        raise InvalidRequest(f"steps {req.steps} is out of range; use {MIN_STEPS} to {MAX_STEPS}.")
    if not isinstance(req.guidance, (int, float)) or isinstance(req.guidance, bool):
        raise InvalidRequest(f"guidance must be a number, got {req.guidance!r}.")
    if not math.isfinite(req.guidance) or not MIN_GUIDANCE <= req.guidance <= MAX_GUIDANCE:
        raise InvalidRequest(
            f"guidance {req.guidance} is out of range; use {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}."
        )
    if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest(f"seed {req.seed!r} is out of range; use 0 to {MAX_SEED}.")
