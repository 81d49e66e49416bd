"""Member-typed options as request fields: sizes, LoRA lists, strengths and input pictures.

Shared by every front (slash commands, buttons, the CLI) so the same words give the same
request, and the same picture is repainted at the same size, wherever they were typed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from bot import imaging
from bot.catalog import ModelEntry
from bot.errors import InvalidRequest
from bot.jobs import DEFAULT_SCHEDULER, MAX_SIZE, MAX_STEPS, MIN_SIZE, LoraSpec, snap_to_8

_SIZE_RE = re.compile(r"^\s*(\d{2,5})\s*[x×*,]\s*(\d{2,5})\s*$", re.IGNORECASE)

#: How much of an input picture is repainted when the member does not say: img2img keeps its
#: composition, inpaint mostly replaces what is under the mask.
DEFAULT_STRENGTH: dict[str, float] = {"img2img": 0.6, "inpaint": 0.9}
#: A variation (the V buttons, the "Vary image" menu): the picture's composition is kept.
VARY_STRENGTH = 0.6


#: The built-in defaults, when neither the member, the model nor the server says.
BUILTIN_STEPS = 20
BUILTIN_GUIDANCE = 7.0


class ServerDefaults(Protocol):
    """What a server uses for models without their own defaults (`guild_config.Defaults`)."""

    @property
    def steps(self) -> int: ...

    @property
    def guidance(self) -> float: ...

    @property
    def scheduler(self) -> str: ...


@dataclass(frozen=True)
class Fallbacks:
    """The built-in `ServerDefaults`, where no server says (the shell's owner, tests)."""

    steps: int = BUILTIN_STEPS
    guidance: float = BUILTIN_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER


def option_defaults(
    entry: ModelEntry,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str | None = None,
    strength: float | None = None,
    server: ServerDefaults | None = None,
) -> dict[str, Any]:
    """Request fields `steps`, `guidance`, `scheduler`, `width` and `height` for `entry`.

    The one resolution every front uses: what the member gave wins; then the model's own
    defaults (models.toml: a 1-step turbo model must not get 20 steps and CFG 7); then the
    server's; then the built-in ones. The size is the model's native one. With a `strength`
    (img2img, inpaint), a step count the member did not give is raised so that at least one
    denoising step runs (diffusers runs int(steps * strength) of them).
    """
    server = server or Fallbacks()
    chosen_steps = next(v for v in (steps, entry.steps, server.steps) if v is not None)
    if steps is None and strength is not None and math.isfinite(strength) and strength > 0:
        while int(chosen_steps * strength) < 1 and chosen_steps < MAX_STEPS:
            chosen_steps += 1
    return {
        "steps": chosen_steps,
        "guidance": next(v for v in (guidance, entry.guidance, server.guidance) if v is not None),
        "scheduler": scheduler or entry.sampler or server.scheduler or DEFAULT_SCHEDULER,
        "width": entry.native_size,
        "height": entry.native_size,
    }


def parse_size(text: str) -> tuple[int, int]:
    """'768x512' -> (768, 512), each rounded down to a multiple of 8."""
    match = _SIZE_RE.match(text)
    if not match:
        raise InvalidRequest(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x768.")
    return snap_to_8(int(match.group(1))), snap_to_8(int(match.group(2)))


def size_suggestions(native: int) -> list[str]:
    """Square, portrait and landscape sizes around a model's native resolution."""
    out = []
    for w, h in ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9)):
        scale = native / max(w, h)
        width, height = snap_to_8(int(w * scale)), snap_to_8(int(h * scale))
        if MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE:
            out.append(f"{width}x{height}")
    return out


def input_size(width: int, height: int, native: int) -> tuple[int, int]:
    """Size to repaint an input image at: its aspect kept, its short side at the model's native
    resolution (the long side capped at MAX_SIZE), multiples of 8."""
    long_side = min(MAX_SIZE, round(native * max(width, height) / max(1, min(width, height))))
    return imaging.fit_size(width, height, max_side=long_side, min_side=MIN_SIZE)


def attachment_bytes(megabytes: float) -> int:
    """The byte limit for input pictures of `megabytes` MB, counted as Discord does (2**20)."""
    return int(megabytes * 1024 * 1024)


def picture_inputs(
    picture: Image.Image,
    *,
    native: int,
    size: tuple[int, int] | None = None,
    inpaint: bool = False,
    mask: Image.Image | None = None,
) -> dict[str, Any]:
    """The request fields of a decoded input picture: width, height, init_image (RGB) and,
    for inpaint, mask_image.

    The picture is resized to `size`, else to its own aspect at the model's `native`
    resolution (`input_size`). The mask is `mask` (white = repaint), else the picture's
    transparent pixels (decode it with keep_alpha for that).
    """
    target = size or input_size(picture.width, picture.height, native)
    out: dict[str, Any] = {
        "width": target[0],
        "height": target[1],
        "init_image": picture.convert("RGB").resize(target, imaging.LANCZOS),
    }
    if inpaint:
        # The picture goes along with a mask too, so the mask is checked against its shape.
        out["mask_image"] = imaging.prepare_mask(picture, mask, target)
    return out


def parse_loras(text: str, known: list[str]) -> tuple[LoraSpec, ...]:
    """'style:0.8, detail' -> LoRA specs; names must exist in the LoRA folder."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight_text = part.partition(":")
        name = name.strip()
        if name not in known:
            available = ", ".join(known) or "none are installed"
            raise InvalidRequest(f"Unknown LoRA {name!r}. Available: {available}.")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise InvalidRequest(
                f"LoRA weight {weight_text!r} for {name!r} is not a number."
            ) from None
        specs.append(LoraSpec(name, weight))
    return tuple(specs)
