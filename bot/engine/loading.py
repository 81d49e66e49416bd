"""Loading catalog models and keeping the most recently used ones in memory (an LRU).

A model's source is located first (`bot.engine.sources`): a typo, a missing file or a Hub
model that is neither downloaded nor reachable is refused before a loaded model is evicted.
Every attempt, failed ones included, is reported as a `LoadRecord`. One loaded model serves all
three modes: the img2img and inpaint pipelines are built from the txt2img one's modules,
sharing its weights.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.backend import LoadRecord
from bot.catalog import Catalog, ModelEntry
from bot.engine.device import free_memory, is_oom
from bot.engine.memory import MB, MemoryProbe, module_bytes, pipeline_modules
from bot.engine.residency import Residency
from bot.engine.sources import (
    load_error,
    locate,
    model_family,
    pipeline_family,
    public_error,
)
from bot.errors import InvalidRequest, ModelLoadError, SettingsError, without_frames

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    entry: ModelEntry
    base: Any  # the StableDiffusionPipeline from_pretrained/from_single_file returned
    scheduler_config: dict[str, Any]
    pipes: dict[str, Any] = field(default_factory=dict)  # mode -> pipeline sharing base's modules
    # LoRA name -> (adapter name, file stamp); most recently used last.
    loras: OrderedDict[str, tuple[str, tuple[int, int]]] = field(default_factory=OrderedDict)
    embeddings: set[str] = field(default_factory=set)

    @property
    def inpainting_unet(self) -> bool:
        return int(self.base.unet.config.in_channels) == 9

    @property
    def family(self) -> str:
        """The model family: "sdxl" or "sd"."""
        return pipeline_family(self.base)


class LoadedModels:
    """The loaded models, least recently used first; loading one may evict the oldest."""

    def __init__(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path,
        catalog: Catalog,
        max_loaded: int,
        on_load: Callable[[LoadRecord], None] | None,
        ram_cache_mb: int = 0,
        probe: MemoryProbe | None = None,
    ) -> None:
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise SettingsError(f"max_loaded must be at least 1, got {max_loaded!r}.")
        self.device = device
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.catalog = catalog
        #: The ceiling (SDBOT_MAX_LOADED_MODELS); with a probe, free memory decides below it.
        self.max_loaded = max_loaded
        self.on_load = on_load
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        #: Room on the device (free memory decides below max_loaded), the RAM tier of
        #: evicted models, and the one safety checker they all share.
        self.residency = Residency(device=device, ram_cache_mb=ram_cache_mb, probe=probe)

    def names(self) -> list[str]:
        """Catalog names of the loaded models, least recently used first."""
        return list(self._models)

    def get(self, name: str) -> LoadedModel:
        """A loaded model by catalog name (KeyError when it is not loaded); for inspection."""
        return self._models[name]

    @property
    def newest_source(self) -> str | None:
        """Source of the most recently used model (None when nothing is loaded)."""
        if not self._models:
            return None
        return next(reversed(self._models.values())).entry.source

    def family_of(self, name: str) -> str | None:
        """The family of loaded model `name` (None when it is not loaded); from any thread."""
        model = self._models.get(name)
        return None if model is None else model.family

    def holds(self, entry: ModelEntry) -> bool:
        """Whether the resolved `entry` is loaded (no catalog lookup: see is_loaded)."""
        return entry.name in self._models

    def is_loaded(self, model: str) -> bool:
        try:
            return self.catalog.resolve(model).name in self._models
        except InvalidRequest:
            return False

    def unload(self, model: str | None = None) -> None:
        """Free one model (or all of them), from the device and from the RAM tier."""
        names = list(self._models) if model is None else [self.catalog.resolve(model).name]
        for name in names:
            if self._models.pop(name, None) is not None or self.residency.forget(name):
                log.info("unloaded model %s", name)
        if model is None and self.residency.forget(None):
            log.info("emptied the RAM tier")
        free_memory(self.device)
        self.residency.measure()

    def ensure(self, model: str) -> LoadedModel:
        """`model` (a catalog name or a source), loading it if needed; now the newest."""
        entry = self.catalog.resolve(model)
        loaded = self._models.get(entry.name)
        if loaded is not None:
            self._models.move_to_end(entry.name)
            return loaded
        started = time.perf_counter()
        residency = self.residency
        restoring = entry.name in residency.ram
        try:
            if not restoring:
                # Reject what cannot load before evicting anything, so a typo (or a Hub model
                # that is not downloaded, offline) leaves the loaded models loaded.
                kind, location = locate(entry, self.cache_dir)
                residency.make_room(self._models, entry.name, self.max_loaded)
                pipe = self._load_pipeline(entry, kind, location)
                residency.share_checker(pipe)
                loaded = LoadedModel(entry, pipe, dict(pipe.scheduler.config))
            else:
                loaded = residency.restore(self._models, entry, self.max_loaded)
        except ModelLoadError as exc:
            self._report(entry, started, ok=False, memory_mb=None, error=exc.message)
            raise
        self._models[entry.name] = loaded
        residency.loaded(entry.name, loaded.base)
        residency.trim(self._models)
        memory = module_bytes(pipeline_modules(loaded.base)) / MB
        self._report(entry, started, ok=True, memory_mb=memory, error=None)
        log.info(
            "loaded model %s (%s) on %s as %s%s: %.0f MB",
            entry.name,
            entry.source,
            self.device,
            self.dtype,
            " from RAM" if restoring else "",
            memory,
        )
        return loaded

    def pipeline(self, loaded: LoadedModel, mode: str) -> Any:
        """The pipeline for `mode`; all modes of a model share one set of weights."""
        # An inpainting UNet (9 input channels) cannot run the plain pipelines: every mode goes
        # through the inpainting pipeline (txt2img = everything masked over a blank image).
        key = "inpaint" if loaded.inpainting_unet else mode
        if key == "txt2img":
            return loaded.base
        pipe = loaded.pipes.get(key)
        if pipe is None:
            # Lazy: importing diffusers takes seconds, and only the worker thread needs it.
            import diffusers

            base = loaded.base
            # Built from the base pipeline's components: the very same module objects, so no
            # weights are copied. (Not from_pipe: it casts the shared modules to its `dtype`
            # argument, float32 by default, which would turn a float16 model into float32.)
            if loaded.family == "sdxl":
                cls: Any = (
                    diffusers.StableDiffusionXLInpaintPipeline
                    if key == "inpaint"
                    else diffusers.StableDiffusionXLImg2ImgPipeline
                )
                options: dict[str, Any] = {
                    "force_zeros_for_empty_prompt": bool(
                        base.config.get("force_zeros_for_empty_prompt", True)
                    ),
                    # sdbot decodes the latents itself: a watermark would never be applied.
                    "add_watermarker": False,
                }
            else:
                cls = (
                    diffusers.StableDiffusionInpaintPipeline
                    if key == "inpaint"
                    else diffusers.StableDiffusionImg2ImgPipeline
                )
                options = {
                    "requires_safety_checker": bool(
                        base.config.get("requires_safety_checker", False)
                    )
                }
            pipe = cls(**base.components, **options)
            pipe.set_progress_bar_config(disable=True)
            loaded.pipes[key] = pipe
        return pipe

    def _report(
        self,
        entry: ModelEntry,
        started: float,
        *,
        ok: bool,
        memory_mb: float | None,
        error: str | None,
    ) -> None:
        if self.on_load is None:
            return
        record = LoadRecord(
            model=entry.name,
            source=entry.source,
            ok=ok,
            seconds=time.perf_counter() - started,
            memory_mb=memory_mb,
            error=error,
        )
        try:
            self.on_load(record)
        except Exception:  # bookkeeping must never fail a load
            log.exception("on_load callback failed for %s", entry.name)

    def _load_pipeline(self, entry: ModelEntry, kind: str, location: str) -> Any:
        # Lazy: importing diffusers takes seconds, and only the worker thread needs it.
        import diffusers.utils.logging
        import transformers.utils.logging
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        # Their per-file progress bars garble the bot's log and the shell; we log the load.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        family = model_family(entry, kind, location)
        # Unannotated in diffusers, hence Any.
        pipeline_cls: Any = (
            StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        )
        try:
            if kind == "single_file":
                config = str(Path(entry.config).expanduser()) if entry.config else None
                # With a local config folder nothing is fetched; without one diffusers infers
                # the architecture and fetches its configs from the Hub once.
                pipe = pipeline_cls.from_single_file(
                    location, config=config, dtype=self.dtype, local_files_only=config is not None
                )
            else:
                # local_files_only: a local folder (builtin:tiny included) never hits the network.
                pipe = _from_pretrained(
                    pipeline_cls, location, entry.variant, self.dtype, local=kind == "folder"
                )
        except Exception as exc:
            raise load_error(entry, kind, location, exc) from exc
        pipe.set_progress_bar_config(disable=True)
        failed: str | None = None
        oom = False
        try:
            pipe.to(self.device)
        except Exception as exc:
            oom = is_oom(exc)
            failed = public_error(exc, location)
            if not oom:
                # The traceback as text: a log handler may keep records, and the frames in
                # them would keep the half-moved modules alive.
                log.error(
                    "moving model %s to %s failed: %s",
                    entry.name,
                    self.device,
                    "".join(traceback.format_exception(exc)).strip(),
                )
            without_frames(exc)
        if failed is None:
            return pipe
        # Outside the handler (the Residency.restore pattern): no frame holds the half-moved
        # modules any more, so they go with `pipe` and their device memory is freed.
        del pipe
        free_memory(self.device)
        if oom:
            raise ModelLoadError(
                f"Model `{entry.public_name}` does not fit in the memory of {self.device}. "
                "Lower SDBOT_MAX_LOADED_MODELS, use SDBOT_DTYPE=float16, or pick a smaller "
                "model."
            )
        raise ModelLoadError(
            f"Model `{entry.public_name}` loaded but could not be moved to {self.device} "
            f"({failed})."
        )


def _from_pretrained(
    pipeline_cls: Any, location: str, variant: str | None, dtype: torch.dtype, *, local: bool
) -> Any:
    """from_pretrained, with the catalog's weights `variant` (e.g. fp16: half the download)
    when the model has it, and its default weights when it has not."""
    if variant:
        try:
            return pipeline_cls.from_pretrained(
                location, dtype=dtype, variant=variant, local_files_only=local
            )
        except (OSError, ValueError) as exc:
            if variant not in str(exc):  # not about the variant: the default weights fail too
                raise
            log.info("%s has no %s weights (%s); loading its default ones", location, variant, exc)
    return pipeline_cls.from_pretrained(location, dtype=dtype, local_files_only=local)


def native_size(pipe: Any) -> tuple[int, int]:
    """(width, height) the pipeline's model was trained at."""
    sample = pipe.unet.config.sample_size
    scale = int(pipe.vae_scale_factor)
    # diffusers stores sample_size as an int or as (height, width).
    height, width = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
    return int(width) * scale, int(height) * scale
