"""The `Engine`: requests in, images out, on one device.

Synchronous on purpose: the bot calls it from a single dedicated GPU worker thread, so there
is no locking here and at most one pipeline call runs at a time. `generate` reads as the
numbered steps of a diffusers pipeline's `__call__`; each step's work lives in its own module
(loading, adapters, prompts, denoise, decode), and this is the one place where torch's errors
become the bot's (`GpuOutOfMemory`, `GenerationFailed`): outside the `except` block, with the
failed run's frames cleared and its memory freed (`failures`). `batch_limit` tells the
executor how many images fit by the device memory free (`memory`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bot.backend import GenerationResult, LoadRecord
from bot.catalog import Catalog, ModelEntry
from bot.engine.adapters import Adapters
from bot.engine.compile import Compiler
from bot.engine.decode import decode_latents
from bot.engine.denoise import SafetyChecker, denoise, safety_flags
from bot.engine.device import enable_tf32, free_memory, resolve_device, resolve_dtype
from bot.engine.failures import RunFailures
from bot.engine.loading import LoadedModel, LoadedModels, native_size
from bot.engine.memory import (
    MemoryProbe,
    batch_images,
    cuda_probe,
    decode_bytes,
    image_bytes,
    memory_stats,
)
from bot.engine.previews import Previews
from bot.engine.prompts import encode_prompt
from bot.engine.results import StepInfo
from bot.errors import GenerationFailed, InvalidRequest, SdbotError
from bot.jobs import GenerationRequest
from bot.model_sources import availability
from bot.samplers import DEFAULT as DEFAULT_SCHEDULER
from bot.samplers import make_scheduler, scheduler_label
from bot.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

    from bot.jobs import Mode

log = logging.getLogger(__name__)

#: Engine.batch_limit where memory does not decide (the executor's max_batch does).
NO_BATCH_LIMIT = 1 << 16

#: The LoRA folder when no catalog is given; the same default as Settings.lora_dir.
DEFAULT_LORA_DIR = Path("data/loras")


class Engine:
    """Loads catalog models (least recently used freed first) and generates images."""

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path,
        catalog: Catalog | None = None,
        max_loaded: int = 1,
        on_load: Callable[[LoadRecord], None] | None = None,
        exact_batches: bool | None = None,
        safety_checker: SafetyChecker | None = None,
        ram_cache_mb: int = 0,
        memory_probe: MemoryProbe | None = None,
        compile: bool = False,
    ) -> None:
        self.device: torch.device = resolve_device(device)
        self.dtype: torch.dtype = resolve_dtype(dtype, self.device)
        enable_tf32(self.device)
        self.cache_dir = Path(cache_dir)
        self.catalog = catalog if catalog is not None else Catalog.load(None, DEFAULT_LORA_DIR)
        self.models = LoadedModels(
            device=self.device,
            dtype=self.dtype,
            cache_dir=self.cache_dir,
            catalog=self.catalog,
            max_loaded=max_loaded,
            on_load=on_load,
            ram_cache_mb=ram_cache_mb,
            # Tests and the benchmark inject a probe; on CUDA the device's own by default.
            probe=memory_probe if memory_probe is not None else cuda_probe(self.device),
        )
        #: Models whose half-precision VAE needed an fp32 re-decode (logged once each).
        self._upcast_logged: set[str] = set()
        self.adapters = Adapters(self.catalog)
        self._entries: dict[str, ModelEntry | None] = {}
        #: Run the UNet once per image inside a batched call, so a batched image is
        #: bit-identical to a solo run with its seed. Kernels pick other summation orders for
        #: other batch sizes (on CPU the UNet's output moves by ~2e-6, which flips ~10 of
        #: 196,608 pixel values by one level at 256px), so this is on by default on CPU/MPS,
        #: where it costs little at full size (SD 1.5 UNet, 512px, batch 2: +5% time, measured
        #: by `sdbot bench gpu`); on CUDA the batched UNet is the point of batching, and
        #: images then match solo runs to within rounding. The VAE and text encoder always
        #: run one image at a time.
        self.exact_batches = self.device.type != "cuda" if exact_batches is None else exact_batches
        #: Judges the images of every model (None: each model's own checker, where it has one).
        #: One checker for all: most fine-tunes and every SDXL model ship without one, and a
        #: server's NSFW policy should not depend on which model a member picked.
        self.safety_checker = safety_checker
        #: Compiles each model's UNet and VAE decoder (bot/engine/compile.py) with `compile`
        #: (SDBOT_COMPILE), for a few size buckets.
        self.compiler: Compiler | None = Compiler() if compile else None
        #: Step previews: TAESD where its weights are in the cache folder, else a linear map.
        self.previews = Previews(self.cache_dir, device=self.device, dtype=self.dtype)

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog) -> Engine:
        """The engine the bot's settings describe (the bot's own, or a Serve replica's)."""
        return cls(
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_dir,
            catalog=catalog,
            max_loaded=settings.max_loaded_models,
            ram_cache_mb=settings.ram_cache_mb,
            compile=settings.compile,
        )

    # -- loading ------------------------------------------------------------------------------

    @property
    def max_loaded(self) -> int:
        """How many models stay loaded at once."""
        return self.models.max_loaded

    @property
    def on_load(self) -> Callable[[LoadRecord], None] | None:
        """Called on the GPU thread after every load attempt; may be set after construction."""
        return self.models.on_load

    @on_load.setter
    def on_load(self, callback: Callable[[LoadRecord], None] | None) -> None:
        self.models.on_load = callback

    @property
    def loaded_models(self) -> list[str]:
        """Catalog names of the loaded models, least recently used first."""
        return self.models.names()

    @property
    def loaded_source(self) -> str | None:
        """Source of the most recently used model (None when nothing is loaded)."""
        return self.models.newest_source

    def is_loaded(self, model: str) -> bool:
        return self.models.is_loaded(model)

    def available(self, model: str) -> str | None:
        """None when `model` can be loaded on this machine, else why not (for members).
        Cheap and offline; see `bot.model_sources.availability`."""
        return availability(self.catalog, model)

    def load(self, model: str) -> Any:
        """The txt2img pipeline of `model` (a catalog name or a source), loading it if needed."""
        loaded = self.models.ensure(model)
        if self.compiler is not None:  # at preload, so the warm-up is not a member's wait
            self.compiler.prepare(loaded, loaded.base)
        return loaded.base

    def pipeline(self, model: str, mode: Mode) -> Any:
        """The pipeline for `mode`; all modes of a model share one set of weights."""
        return self.models.pipeline(self.models.ensure(model), mode)

    def unload(self, model: str | None = None) -> None:
        """Free one model (or all of them)."""
        self.models.unload(model)

    # -- memory -------------------------------------------------------------------------------

    def batch_limit(self, request: GenerationRequest) -> int:
        """Most images like `request`'s that one call should make, by the device memory free
        after the last load or run (the executor caps its batches with it; SDBOT_MAX_BATCH
        stays the ceiling). Plain arithmetic on a cached figure: safe from any thread.
        A large number where there is no device memory to go by (CPU, MPS; on CUDA before
        the first load)."""
        free = self.models.residency.free_bytes
        if free is None:
            return NO_BATCH_LIMIT
        entry = self._entry(request.model)
        if entry is None or not self.models.holds(entry):
            # Its weights will take room before the batch runs.
            free -= self.models.residency.expected_bytes(None if entry is None else entry.name)
        # A loaded model knows its family; the catalog's may be unset (found out at load).
        loaded = None if entry is None else self.models.family_of(entry.name)
        xl = (loaded or getattr(entry, "family", None)) == "sdxl"
        w, h = request.width, request.height
        per_image = image_bytes(w, h, cfg=request.guidance > 1.0, dtype=self.dtype, xl=xl)
        return batch_images(free, per_image=per_image, reserve=decode_bytes(w, h, dtype=self.dtype))

    def memory_stats(self) -> dict[str, float]:
        """allocated_mb and reserved_mb of torch's CUDA allocator on this device (0s off CUDA)."""
        return memory_stats(self.device)

    def _entry(self, model: str) -> ModelEntry | None:
        # Cached per model string: a model named by its source resolves by reading its files
        # (its native size), and batch_limit runs under the dispatcher's lock.
        if model not in self._entries:
            try:
                self._entries[model] = self.catalog.resolve(model)
            except InvalidRequest:
                self._entries[model] = None
        return self._entries[model]

    def native_size(self, source: str) -> tuple[int, int]:
        """(width, height) the model was trained at; other sizes work but may look worse."""
        return native_size(self.load(source))

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> list[GenerationResult]:
        """Run requests that share one batch_key() as one batch; one result per request.

        Image i of the batch uses its own CPU generator seeded with its seed, so it equals the
        image a solo run with that seed gives (bit for bit when `exact_batches`).
        JobCancelled raised by `on_step` propagates; running out of GPU memory raises
        GpuOutOfMemory (the caller may split the batch); anything else the pipeline raises
        becomes GenerationFailed. Bad LoRA names and the like raise InvalidRequest.
        """
        # 1. Check inputs
        if not requests:
            return []
        first = requests[0]
        key = first.batch_key()
        if any(r.batch_key() != key for r in requests[1:]):
            raise InvalidRequest("These requests cannot share a batch (their settings differ).")

        # 2. Load the model, and its pipeline for this mode
        loaded = self.models.ensure(first.model)
        pipe = self.models.pipeline(loaded, first.mode)
        if self.compiler is not None:
            self.compiler.prepare(loaded, pipe)

        # 3. Prepare the scheduler
        sampler = self._set_scheduler(pipe, loaded, first.scheduler)

        # 4. Apply the LoRAs, for this call only
        failures = RunFailures(requests)
        with failures, self.adapters.applied(loaded, first.loras):
            # 5. Load the textual-inversion embeddings the prompts name
            self.adapters.load_embeddings(loaded, requests)
            # Only now: adapter and embedding weights outlive this call, and tensors made in
            # inference mode cannot be changed in place after it.
            with torch.inference_mode():
                # 6. Encode the prompts
                cfg = first.guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
                prepared = [encode_prompt(pipe, r, cfg=cfg, device=self.device) for r in requests]

                # 7. Denoise: one pipeline call per prompt length, a CPU generator per image
                latents = denoise(
                    pipe,
                    requests,
                    prepared,
                    on_step,
                    exact=self.exact_batches,
                    previews=self.previews,
                )

                # 8. Decode the latents
                images = [
                    image
                    for batch in latents
                    for image in decode_latents(
                        pipe, batch, model=loaded.entry.name, upcast_logged=self._upcast_logged
                    )
                ]

                # 9. Run the safety checker (ours, else the model's, else the shared one)
                residency = self.models.residency
                nsfw = safety_flags(
                    pipe,
                    images,
                    device=self.device,
                    dtype=self.dtype,
                    checker=self.safety_checker,
                    shared=(residency.safety_checker, residency.feature_extractor),
                )
        failed = failures.take()
        if failed is not None:
            # Outside every handler: the failed run's frames, and the tensors they held, are
            # unreachable now, so this frees them before anyone retries.
            free_memory(self.device)
            self.models.residency.measure()
            raise failed
        self.models.residency.measure()

        # 10. Hand each request its images
        return _per_request(requests, images, nsfw, sampler)

    def _set_scheduler(self, pipe: Any, loaded: LoadedModel, name: str) -> str:
        """Give `pipe` a fresh `name` scheduler; the A1111 sampler name for the PNG."""
        try:
            # Fresh each call: schedulers keep per-run state, which a cancelled run would leak.
            scheduler = make_scheduler(name, loaded.scheduler_config)
        except SdbotError:
            raise
        except Exception as exc:
            log.exception("scheduler %s failed for %s", name, loaded.entry.name)
            raise GenerationFailed(
                f"The {name} sampler does not work with model {loaded.entry.public_name}; "
                "pick another sampler."
            ) from exc
        pipe.scheduler = scheduler
        return scheduler_label(scheduler) if name == DEFAULT_SCHEDULER else name


def _per_request(
    requests: Sequence[GenerationRequest],
    images: list[Image.Image],
    nsfw: list[bool],
    sampler: str,
) -> list[GenerationResult]:
    assert len(images) == sum(r.count for r in requests)
    results: list[GenerationResult] = []
    offset = 0
    for request in requests:
        n = request.count
        results.append(
            GenerationResult(
                images=images[offset : offset + n],
                seeds=request.seeds,
                nsfw=nsfw[offset : offset + n],
                sampler=sampler,
            )
        )
        offset += n
    return results
