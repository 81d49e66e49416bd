"""Stable Diffusion on one device: the model catalog's pipelines, turned into images.

Synchronous on purpose: the bot calls it from a single dedicated GPU worker thread, so there
is no locking here and at most one pipeline call runs at a time.

One loaded model serves all three modes: img2img and inpaint pipelines are derived from the
txt2img one, sharing its UNet, VAE and text encoder (no second copy in memory). A batch of
compatible requests (equal `batch_key()`) runs as one pipeline call with one CPU generator
per image, and image i of the batch is the image a solo run with its seed gives (see
`Engine.exact_batches`).

The package, in the order `Engine.generate` uses it:
- `engine`: the `Engine` front; `generate` as numbered steps; torch errors -> bot errors.
- `loading` (+ `sources`): locating and loading models, the LRU of loaded ones, load records.
- `adapters`: LoRAs and textual-inversion embeddings.
- `prompts`: prompt encoding, long prompts in 75-token chunks.
- `denoise`: the pipeline calls of a batch and the safety check (the model's own checker, or
  one `Engine(safety_checker=...)` shared by all models).
- `exact`: the UNet run once per image inside a batched call (batch-invariant images).
- `previews`: each step's predicted final image, through TAESD or a linear latent map.
- `decode`: VAE decoding, tiled after an out-of-memory, again in fp32 after NaNs.
- `results`: what each step gives (`StepInfo` with previews); the images come back as
  `bot.backend.GenerationResult`.
- `failures`: a failed run turned into the bot's error, its frames dropped before any retry.
- `compile`: opt-in torch.compile of the UNet and VAE decoder for a few size buckets.
- `memory`, `residency`: free-memory probes, batch and model limits, the RAM tier, the shared
  safety checker.
- `device`: device and dtype (bf16/fp16 policy, TF32), out-of-memory detection, freeing memory.

Nothing here imports discord: the executor (or a Ray Serve replica) drives it.
"""

from __future__ import annotations

from bot.backend import GenerationResult, LoadRecord
from bot.catalog import BUILTIN_TINY
from bot.engine.adapters import MAX_CACHED_LORAS
from bot.engine.denoise import SafetyChecker
from bot.engine.device import resolve_device, resolve_dtype
from bot.engine.engine import Engine
from bot.engine.results import StepInfo, latents_preview

__all__ = [
    "BUILTIN_TINY",
    "MAX_CACHED_LORAS",
    "Engine",
    "GenerationResult",
    "LoadRecord",
    "SafetyChecker",
    "StepInfo",
    "latents_preview",
    "resolve_device",
    "resolve_dtype",
]
