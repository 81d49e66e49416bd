"""Latents to pixels: the VAE decode, one image at a time, with its two guards.

- **Black images**: a half-precision VAE can overflow into NaN/inf (SD 1.x VAEs on some
  prompts, every SDXL VAE in fp16), which decodes to a black image. Such an output is decoded
  again in fp32 (AUTOMATIC1111's behaviour), logged once per model; a VAE whose config says
  `force_upcast` (SDXL's) is decoded in fp32 from the start when the model runs in fp16.
- **Out of memory**: the decode is the largest allocation of a run at 512 px and up. When it
  runs out of memory it is retried with VAE tiling for that one image, outside the `except`
  block (so the failed attempt's activations are freed first), instead of the whole batch
  being denoised again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from bot.engine.device import free_memory, is_oom
from bot.errors import without_frames

log = logging.getLogger(__name__)


def decode_latents(
    pipe: Any, latents: torch.Tensor, *, model: str = "", upcast_logged: set[str] | None = None
) -> list[Image.Image]:
    """RGB images of `latents`, decoded by the model's VAE.

    `upcast_logged`: names of models whose NaN re-decode was logged already (updated here).
    """
    # One image at a time: a batch-size-independent result, and the VAE's peak memory
    # (the largest of the whole run at 512px and up) stays that of a single image.
    out: list[Image.Image] = []
    vae = pipe.vae
    # A VAE that says it needs float32 under fp16 (SDXL's) decodes the whole batch in it:
    # one cast there and back, not two per image.
    forced = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    with _in_fp32(vae) if forced else contextlib.nullcontext():
        for i in range(latents.shape[0]):
            decoded = _decode_guarded(pipe, latents[i : i + 1], model, upcast_logged)
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
            out.append(pil if pil.mode == "RGB" else pil.convert("RGB"))
    return out


def _decode_guarded(
    pipe: Any, latents: torch.Tensor, model: str, upcast_logged: set[str] | None
) -> torch.Tensor:
    vae = pipe.vae
    decoded = _decode_tiling_on_oom(pipe, latents)
    if vae.dtype != torch.float32 and not bool(torch.isfinite(decoded).all()):
        logged = upcast_logged if upcast_logged is not None else set()
        if model not in logged:
            logged.add(model)
            log.warning(
                "model %s: the %s VAE gave NaN/inf (a black image); decoding again in float32 "
                "(logged once per model)",
                model or "?",
                vae.dtype,
            )
        decoded = _decode_fp32(pipe, latents)
    return decoded


def _decode_fp32(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The decode with the VAE cast to float32 for this one call."""
    with _in_fp32(pipe.vae):
        return _decode_tiling_on_oom(pipe, latents.to(torch.float32))


@contextlib.contextmanager
def _in_fp32(vae: Any) -> Iterator[None]:
    """The VAE cast to float32 inside, back to its dtype after."""
    dtype = vae.dtype
    # torch's own `to`: diffusers' warns on every cast about modules to keep in float32, and
    # this cast is exactly that, for a while.
    torch.nn.Module.to(vae, torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(vae, dtype)


def _decode_tiling_on_oom(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    try:
        return _decode(pipe, latents)
    except Exception as exc:
        if not is_oom(exc) or getattr(pipe.vae, "use_tiling", False):
            raise
        without_frames(exc)
    # Out of the handler: the failed attempt's frames (and its activations) are gone now.
    free_memory(latents.device)
    log.warning("the VAE decode ran out of memory; decoding again in tiles")
    with _tiled(pipe.vae):
        return _decode(pipe, latents)


def _decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    decoded: torch.Tensor = vae.decode(latents.to(vae.dtype) / scale, return_dict=False)[0]
    return decoded


@contextlib.contextmanager
def _tiled(vae: Any) -> Iterator[None]:
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()
