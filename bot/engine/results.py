"""What the engine hands back: images per request, progress with cheap previews, load records.

Plain data for the executor (which stores load records and posts previews and images); the
only torch here is the latent -> RGB map of `latents_preview` (bot/engine/previews.py picks
the map, or a TAESD decoder, per model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

#: Latent -> RGB factors (rows: latent channels; columns: R, G, B) and an RGB bias.
LatentRgb = tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]

# A1111's "Approx cheap" latent -> RGB factors for SD 1.x/2.x latents: a preview without the
# VAE (costs one tiny matrix product instead of a decoder pass).
SD_LATENT_RGB: LatentRgb = (
    (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    (0.0, 0.0, 0.0),
)
# SDXL's VAE has its own latent space (ComfyUI's SDXL latent_rgb_factors and bias).
SDXL_LATENT_RGB: LatentRgb = (
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
)

#: One image's latents (channels x h x w) -> a preview image.
PreviewDecoder = Callable[[torch.Tensor], Image.Image]


@dataclass(frozen=True)
class StepInfo:
    """Progress of one pipeline call, passed to `on_step` after every denoising step."""

    step: int
    total: int
    # Per request of the call: (the running batch's predicted final latents, falling back to
    # its noisy latents, and the row of its first image), or None while that request waits
    # for a later pipeline call of the same generate().
    _rows: tuple[tuple[Any, int] | None, ...] = field(default=(), repr=False, compare=False)
    _latent_size: tuple[int, int] = field(default=(8, 8), repr=False, compare=False)
    _decode: PreviewDecoder | None = field(default=None, repr=False, compare=False)

    def preview(self, index: int) -> Image.Image:
        """A cheap preview of what request `index`'s first image will look like.

        Computed only when called (nothing is copied off the GPU otherwise): the predicted
        final image (x0) of this step through TAESD when its weights are at hand (full size),
        else through a fixed linear map (1/8 of the final size). Call it from `on_step`, on
        the GPU thread.
        """
        source = self._rows[index]
        if source is None:
            width, height = self._latent_size
            return Image.new("RGB", (width, height), (128, 128, 128))
        latents, row = source
        decode = self._decode if self._decode is not None else latents_preview
        return decode(latents[row])


def latents_preview(latents: torch.Tensor, latent_rgb: LatentRgb = SD_LATENT_RGB) -> Image.Image:
    """RGB approximation of one image's latents (4 x h x w) -> an h x w PIL image."""
    factors, bias = latent_rgb
    weights = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    offset = torch.tensor(bias, dtype=torch.float32, device=latents.device)
    # The map runs where the latents are; only the small RGB result crosses to the host.
    lat = latents.detach()[: weights.shape[0]].float()
    rgb = torch.einsum("chw,cr->hwr", lat, weights) + offset
    return _to_image(rgb)


def rgb_preview(pixels: torch.Tensor) -> Image.Image:
    """An RGB image (3 x h x w, values in -1..1, any device) -> a PIL image."""
    return _to_image(pixels.detach()[:3].float().permute(1, 2, 0))


def _to_image(rgb: torch.Tensor) -> Image.Image:
    array = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(array, "RGB")
