"""Previews of the predicted final image while a batch denoises.

Two parts, both on the GPU thread:
- `capture_x0`: wraps the scheduler's `step` for one pipeline call and keeps the step's
  prediction of the final latents (x0): `pred_original_sample` where the scheduler returns it
  (Euler, Euler a, Heun, DPM2, DDIM, LMS), `denoised` (LCM), or the data prediction multistep
  solvers keep (DPM++ and UniPC); None for the rest (PLMS), whose previews show the noisy
  latents. Keeping a reference costs nothing: no copy, no host sync.
- `Previews`: per model family, the decoder a preview goes through: TAESD
  (`diffusers.AutoencoderTiny`, full-size previews) when its weights are in the cache folder
  (`<cache_dir>/taesd` for SD 1.x/2.x, `<cache_dir>/taesdxl` for SDXL; never downloaded),
  else the linear latent -> RGB map of that family (1/8 of the final size).

Previews are computed only when the executor sends one (at most once a second per job), so
neither part runs a kernel on the steps in between.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bot.engine.patching import patched
from bot.engine.results import (
    SD_LATENT_RGB,
    SDXL_LATENT_RGB,
    PreviewDecoder,
    latents_preview,
    rgb_preview,
)
from bot.engine.sources import pipeline_family

log = logging.getLogger(__name__)

#: Folder (under the cache dir) holding a diffusers AutoencoderTiny, per model family.
TAESD_DIRS = {"sd": "taesd", "sdxl": "taesdxl"}

# Multistep solvers whose kept model outputs are data (x0) predictions for these settings.
_X0_ALGORITHMS = {"dpmsolver++", "sde-dpmsolver++"}


class X0:
    """The latest x0 prediction of one pipeline call (None until a scheduler step gives one)."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None

    def of(self, latents: torch.Tensor) -> torch.Tensor:
        """The latest x0 when it has `latents`' shape, else `latents` themselves."""
        x0 = self.latest
        return x0 if x0 is not None and x0.shape == latents.shape else latents


def _x0_from(scheduler: Any, output: Any) -> torch.Tensor | None:
    if isinstance(output, tuple):
        if len(output) > 1 and isinstance(output[1], torch.Tensor):
            return output[1]
    else:
        for name in ("pred_original_sample", "denoised"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
    kept = getattr(scheduler, "model_outputs", None)
    if not kept or not isinstance(kept[-1], torch.Tensor):
        return None
    config = scheduler.config
    if getattr(config, "algorithm_type", None) in _X0_ALGORITHMS:
        return kept[-1]  # DPM++: converted to a data prediction before it is kept
    if getattr(config, "predict_x0", False) and "UniPC" in type(scheduler).__name__:
        return kept[-1]
    return None


@contextlib.contextmanager
def capture_x0(pipe: Any, holder: X0) -> Iterator[X0]:
    """While active, every `pipe.scheduler.step` records its x0 prediction in `holder`."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        yield holder
        return
    original = scheduler.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        holder.latest = _x0_from(scheduler, output)
        return output

    with patched(scheduler, "step", step):
        yield holder


class Previews:
    """Preview decoders per model family; TAESD weights are looked up once per family."""

    def __init__(self, cache_dir: Path | None, *, device: torch.device, dtype: torch.dtype):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = device
        self.dtype = dtype
        self._tiny: dict[str, Any] = {}  # family -> AutoencoderTiny, or None: not available

    def decoder(self, pipe: Any) -> PreviewDecoder:
        """How `pipe`'s latents become a preview."""
        kind = pipeline_family(pipe)
        tiny = self._taesd(kind)
        if tiny is not None:
            return functools.partial(_taesd_preview, tiny)
        return linear_decoder(kind)

    def _taesd(self, kind: str) -> Any:
        if kind in self._tiny:
            return self._tiny[kind]
        tiny = None
        folder = self.cache_dir / TAESD_DIRS[kind] if self.cache_dir is not None else None
        if folder is not None and (folder / "config.json").is_file():
            try:
                # Lazy: diffusers takes seconds to import; only when the weights exist.
                from diffusers import AutoencoderTiny

                tiny = AutoencoderTiny.from_pretrained(
                    str(folder), torch_dtype=self.dtype, local_files_only=True
                ).to(self.device)
                tiny.requires_grad_(False)
                log.info("previews for %s models through TAESD from %s", kind, folder)
            except Exception:
                log.warning("TAESD in %s did not load; linear previews", folder, exc_info=True)
                tiny = None
        self._tiny[kind] = tiny
        return tiny


def linear_decoder(kind: str) -> PreviewDecoder:
    """The linear latent -> RGB map of model family `kind`."""
    factors = SDXL_LATENT_RGB if kind == "sdxl" else SD_LATENT_RGB
    return functools.partial(latents_preview, latent_rgb=factors)


def _taesd_preview(tiny: Any, latents: torch.Tensor) -> Any:
    # TAESD takes the scaled latents the pipeline denoises (its scaling_factor is 1.0) and
    # returns pixels in -1..1.
    with torch.inference_mode():
        sample = latents[None].to(device=tiny.device, dtype=tiny.dtype)
        pixels = tiny.decode(sample, return_dict=False)[0][0]
    return rgb_preview(pixels)
