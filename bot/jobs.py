"""The validated generation request: one frozen dataclass, checked in one place."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from bot.errors import InvalidRequest
from bot.samplers import canonical_name

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


Mode = Literal["txt2img", "img2img", "inpaint"]
MODES: tuple[Mode, ...] = ("txt2img", "img2img", "inpaint")
MAX_COUNT = 4
MIN_STRENGTH = 0.05
MAX_STRENGTH = 1.0
DEFAULT_SCHEDULER = "default"  # the model's own scheduler
MAX_LORAS = 4
MIN_LORA_WEIGHT = -2.0
MAX_LORA_WEIGHT = 2.0
# A LoRA name is a file stem in the LoRA folder: no separators, so it can never name a path.
_LORA_NAME = re.compile(r"^[^/\\\x00]{1,100}$")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA from the catalog's LoRA folder, applied with a weight."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the engine needs to make an image. Built once, validated once, never edited.

    `count` images use seeds seed, seed+1, ...; img2img/inpaint carry their decoded (RGB)
    input image and, for inpaint, an "L" mask (white = repaint) of the same size.
    """

    prompt: str
    model: str
    width: int
    height: int
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    seed: int = field(default_factory=new_seed)
    mode: Mode = "txt2img"
    scheduler: str = DEFAULT_SCHEDULER
    count: int = 1
    strength: float = 0.75
    loras: tuple[LoraSpec, ...] = ()
    # Images are compared by identity only: requests are hashed/compared for batching by key.
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    mask_image: Image.Image | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_inputs(self)
        # One spelling per sampler, so "euler a" and "Euler a" share a batch_key().
        object.__setattr__(self, "scheduler", canonical_name(self.scheduler))

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.count)]

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call (one generator per image)."""
        strength = self.strength if self.mode != "txt2img" else None
        return (
            self.model,
            self.mode,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.scheduler,
            strength,
            self.loras,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe parameters for the job row (images are not stored here)."""
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "mode": self.mode,
            "scheduler": self.scheduler,
            "count": self.count,
            "loras": [[lora.name, lora.weight] for lora in self.loras],
        }
        if self.mode != "txt2img":
            out["strength"] = self.strength
        return out


def check_size_range(name: str, value: int) -> None:
    """sdbot's bounds on a width or height (every front, before the server's maxima)."""
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise InvalidRequest(
            f"{name} {value} is out of range; use {MIN_SIZE} to {MAX_SIZE} pixels."
        )


def check_steps_range(steps: int) -> None:
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidRequest(f"steps {steps} is out of range; use {MIN_STEPS} to {MAX_STEPS}.")


def check_count_range(count: int) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise InvalidRequest(f"count {count!r} is out of range; use 1 to {MAX_COUNT}.")


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
        check_size_range(name, value)
        if value % 8:
            raise InvalidRequest(f"{name} {value} is not a multiple of 8; try {snap_to_8(value)}.")
    if isinstance(req.steps, bool) or not isinstance(req.steps, int):
        raise InvalidRequest(f"steps must be a whole number, got {req.steps!r}.")
    check_steps_range(req.steps)
    if not isinstance(req.guidance, (int, float)) or isinstance(req.guidance, bool):
        raise InvalidRequest(f"guidance must be a number, got {req.guidance!r}.")
    if not math.isfinite(req.guidance) or not MIN_GUIDANCE <= req.guidance <= MAX_GUIDANCE:
        raise InvalidRequest(
            f"guidance {req.guidance} is out of range; use {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}."
        )
    if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest(f"seed {req.seed!r} is out of range; use 0 to {MAX_SEED}.")
    if req.mode not in MODES:
        raise InvalidRequest(f"mode {req.mode!r} is unknown; use one of {', '.join(MODES)}.")
    if isinstance(req.count, bool) or not isinstance(req.count, int):
        raise InvalidRequest(f"count {req.count!r} is out of range; use 1 to {MAX_COUNT}.")
    check_count_range(req.count)
    if not isinstance(req.scheduler, str) or not req.scheduler:
        raise InvalidRequest("No scheduler was given.")
    canonical_name(req.scheduler)  # raises naming the allowed samplers
    if req.mode != "txt2img":
        if not isinstance(req.strength, (int, float)) or isinstance(req.strength, bool):
            raise InvalidRequest(f"strength must be a number, got {req.strength!r}.")
        if not math.isfinite(req.strength) or not MIN_STRENGTH <= req.strength <= MAX_STRENGTH:
            raise InvalidRequest(
                f"strength {req.strength} is out of range; "
                f"use {MIN_STRENGTH:g} to {MAX_STRENGTH:g}."
            )
        if int(req.steps * req.strength) < 1:
            # diffusers runs int(steps * strength) steps; zero would be a no-op image.
            raise InvalidRequest(
                f"strength {req.strength:g} with {req.steps} steps leaves no denoising step; "
                f"use at least {math.ceil(1 / req.strength)} steps or a higher strength."
            )
        if not isinstance(req.init_image, Image.Image):
            raise InvalidRequest(f"{req.mode} needs an input image.")
    if req.mode == "inpaint":
        if not isinstance(req.mask_image, Image.Image):
            raise InvalidRequest("inpaint needs a mask (or an image with transparent areas).")
        assert req.init_image is not None
        if req.mask_image.size != req.init_image.size:
            raise InvalidRequest(
                f"The mask is {req.mask_image.width}x{req.mask_image.height} but the image is "
                f"{req.init_image.width}x{req.init_image.height}; they must be the same size."
            )
    if not isinstance(req.loras, tuple):
        raise InvalidRequest("loras must be a tuple of LoraSpec.")
    if len(req.loras) > MAX_LORAS:
        raise InvalidRequest(f"{len(req.loras)} LoRAs were given; the limit is {MAX_LORAS}.")
    for lora in req.loras:
        if not isinstance(lora, LoraSpec):
            raise InvalidRequest(f"LoRA {lora!r} is not a LoRA choice.")
    names = [lora.name for lora in req.loras]
    if len(set(names)) != len(names):
        raise InvalidRequest("The same LoRA was given twice; give each LoRA once, with one weight.")
    for lora in req.loras:
        if not isinstance(lora.name, str) or not _LORA_NAME.match(lora.name):
            raise InvalidRequest(
                f"LoRA name {lora.name!r} is not valid; use the name of a LoRA in the list."
            )
        if isinstance(lora.weight, bool) or not isinstance(lora.weight, (int, float)):
            raise InvalidRequest(f"LoRA weight for {lora.name!r} must be a number.")
        if not math.isfinite(lora.weight) or not MIN_LORA_WEIGHT <= lora.weight <= MAX_LORA_WEIGHT:
            raise InvalidRequest(
                f"LoRA weight {lora.weight} for {lora.name!r} is out of range; "
                f"use {MIN_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}."
            )
