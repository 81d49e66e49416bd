"""What the engine hands back: images per request, progress with cheap previews, load records.

Plain data for the executor (which stores load records and posts previews and images); the
only torch here is the latent -> RGB map of `latents_preview`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

# A1111's "Approx cheap" latent -> RGB factors for SD 1.x/2.x latents: a preview without the
# VAE (costs one tiny matrix product instead of a decoder pass).
_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


@dataclass(frozen=True)
class LoadRecord:
    """One model load attempt, reported to `Engine.on_load` (the executor stores it)."""

    model: str
    source: str
    ok: bool
    seconds: float
    memory_mb: float | None
    error: str | None


@dataclass(frozen=True)
class StepInfo:
    """Progress of one pipeline call, passed to `on_step` after every denoising step."""

    step: int
    total: int
    # Per request of the call: (latents of the running batch, row of its first image), or
    # None while that request waits for a later pipeline call of the same generate().
    _rows: tuple[tuple[Any, int] | None, ...] = field(default=(), repr=False, compare=False)
    _latent_size: tuple[int, int] = field(default=(8, 8), repr=False, compare=False)

    def preview(self, index: int) -> Image.Image:
        """A small, cheap preview of request `index`'s first image at this step.

        Computed only when called (a fixed linear map of the latents, no VAE); the image is
        1/8 of the final size. Call it from `on_step`, on the GPU thread.
        """
        source = self._rows[index]
        if source is None:
            width, height = self._latent_size
            return Image.new("RGB", (width, height), (128, 128, 128))
        latents, row = source
        return latents_preview(latents[row])


@dataclass
class GenerationResult:
    """The images of one request, in seed order."""

    images: list[Image.Image]
    seeds: list[int]
    #: Per image: flagged by the engine's safety checker, else by the model's own (all False
    #: when there is none).
    #: Images are returned unaltered; the front end blurs, spoilers or blocks by policy.
    nsfw: list[bool]
    #: The A1111 sampler name for the PNG `Sampler:` field.
    sampler: str


def latents_preview(latents: torch.Tensor) -> Image.Image:
    """RGB approximation of one image's SD latents (4 x h x w) -> an h x w PIL image."""
    lat = latents.detach()[:4].float().cpu()
    factors = torch.tensor(_LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", lat, factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")
