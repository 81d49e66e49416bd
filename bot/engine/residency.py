"""Which models stay on the device, and where evicted ones go.

`Residency` is the policy half of `bot.engine.loading.LoadedModels` (which owns the LRU of
loaded models and the loading itself):
- **Room**: before a load, the least recently used models are evicted until the newcomer is
  below SDBOT_MAX_LOADED_MODELS and, where the device reports its memory (CUDA), until its
  weights plus a working margin are free; after a load, older models go while less than that
  margin remains. So a big card keeps several models and a small one keeps one.
- **The RAM tier**: an evicted model's modules move to (pinned, on CUDA) CPU RAM within
  SDBOT_RAM_CACHE_MB instead of being dropped, least recently evicted dropped first, so
  switching back is a copy, not a disk load. The pinned blocks a model leaves when it moves
  back stay for the next eviction (pinning is what costs, not copying), within the budget.
  On CPU they are in RAM already: the tier keeps the pipeline object instead of dropping it.
- **One safety checker** for every model: the first loaded model's, with its feature
  extractor; later models' own copies are replaced by it (they are the same CompVis
  classifier) and never moved to the RAM tier. Models without one (SDXL pipelines have no
  checker, nor do checker-less fine-tunes) are checked with it too: it works on any RGB image.
  Before any model with a checker has loaded there is nothing to check with.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Protocol, TypeVar

import torch

from bot.catalog import ModelEntry
from bot.engine.device import free_memory
from bot.engine.memory import (
    MemoryInfo,
    MemoryProbe,
    RamTier,
    module_bytes,
    move_modules,
    pipeline_modules,
    ram_bytes,
    release_pinned,
    working_margin,
)
from bot.engine.sources import public_error
from bot.errors import ModelLoadError, without_frames

log = logging.getLogger(__name__)


class Resident(Protocol):
    """A loaded model as the policy sees it: its txt2img pipeline, whose modules every mode
    shares."""

    @property
    def base(self) -> Any: ...


M = TypeVar("M", bound=Resident)


class Residency:
    """Room on the device, the RAM tier and the shared safety checker of one engine."""

    def __init__(
        self, *, device: torch.device, ram_cache_mb: int, probe: MemoryProbe | None
    ) -> None:
        self.device = device
        self.probe = probe
        #: Evicted models kept in CPU RAM (SDBOT_RAM_CACHE_MB), by catalog name.
        self.ram: RamTier[Any] = RamTier(ram_cache_mb)
        #: The one safety checker all models share: the first loaded model's that has one.
        self.safety_checker: Any = None
        #: The feature extractor that came with it (CLIP preprocessing of its inputs).
        self.feature_extractor: Any = None
        #: Device memory free after the last load or run (None: no probe on this device, or
        #: nothing measured yet: construction does not touch CUDA, the GPU thread does).
        self.free_bytes: int | None = None
        self._sizes: dict[str, int] = {}  # catalog name -> bytes its weights take on the device

    def measure(self) -> MemoryInfo | None:
        """Probe the device's memory now (GPU thread) and remember what is free."""
        if self.probe is None:
            return None
        info = self.probe()
        self.free_bytes = info.free
        return info

    def expected_bytes(self, name: str | None) -> int:
        """What `name`'s weights take on the device: as measured when it last loaded, else
        the largest model seen (0 before any load)."""
        if name is not None and name in self._sizes:
            return self._sizes[name]
        return max(self._sizes.values(), default=0)

    def loaded(self, name: str, pipe: Any) -> None:
        """`name` is on the device now: remember what its weights take there."""
        self._sizes[name] = module_bytes(pipeline_modules(pipe, skip=self.safety_checker))

    def make_room(self, models: OrderedDict[str, M], name: str, ceiling: int) -> None:
        """Evict least recently used `models` until `name` may load: below `ceiling`, and
        (with a probe) with its weights plus a working margin free."""
        while len(models) >= ceiling:
            # Free before loading: two SD models may not fit in VRAM together.
            self._evict_oldest(models, name)
        info = self.measure()
        while info is not None and models:
            if info.free >= self.expected_bytes(name) + working_margin(info.total):
                return
            self._evict_oldest(models, name)
            info = self.measure()

    def trim(self, models: OrderedDict[str, M]) -> None:
        """After a load: evict older models while less than a working margin is free."""
        info = self.measure()
        while info is not None and len(models) > 1 and info.free < working_margin(info.total):
            self._evict_oldest(models, next(reversed(models)))
            info = self.measure()

    def _evict_oldest(self, models: OrderedDict[str, M], newcomer: str) -> None:
        name, model = models.popitem(last=False)
        # What it takes in RAM, as the budget counts it: pinned copies (from CUDA) take each
        # tensor rounded up to a power of two.
        modules = pipeline_modules(model.base, skip=self.safety_checker)
        size = ram_bytes(modules, pinned=self._pinned) if self.ram.budget else 0
        dropped: list[str] = []
        kept = self.ram.fits(size)
        if kept:
            if self.ram.crowded(size):
                self._unpin_spare()  # before pinning more beside them
            move_modules(model.base, torch.device("cpu"), skip=self.safety_checker)
            dropped = self.ram.put(name, model, size)
            for gone in dropped:
                log.info("dropped model %s from RAM (SDBOT_RAM_CACHE_MB is full)", gone)
            log.info("moved model %s to RAM to make room for %s", name, newcomer)
        else:
            log.info("evicting model %s to make room for %s", name, newcomer)
        del model
        if dropped:
            self._release()  # their pinned blocks
        elif not kept:
            # A pipeline holds reference cycles: only a collection frees its weights. A model
            # kept in RAM needs none (its device tensors were replaced, so freed), and a
            # collection is most of a switch back's time (0.33 of 0.6 s on an H200).
            free_memory(self.device)

    @property
    def _pinned(self) -> bool:
        """Whether the tier's copies are pinned (from CUDA), as opposed to plain RAM."""
        return self.device.type == "cuda"

    def _release(self) -> None:
        """Collect what was dropped and give every unused pinned block back to the OS."""
        free_memory(self.device)
        self._unpin_spare()

    def _unpin_spare(self) -> None:
        release_pinned()
        self.ram.spare = 0

    def restore(self, models: OrderedDict[str, M], entry: ModelEntry, ceiling: int) -> M:
        """`entry`'s model from the RAM tier back on the device: a copy, not a disk load."""
        held = self.ram.take(entry.name)
        assert held is not None
        kept: M = held[0]
        size = held[1]
        # Out of the tier before making room, so that evictions into it cannot drop it.
        self.make_room(models, entry.name, ceiling)
        failed: str | None = None
        try:
            move_modules(kept.base, self.device, skip=self.safety_checker)
        except Exception as exc:
            failed = public_error(exc, entry.source)
            without_frames(exc)
        if failed is None:
            if self._pinned:
                self.ram.spare += size  # its pinned copy, free for the next eviction
                if self.ram.used + self.ram.spare > self.ram.budget:
                    self._unpin_spare()
            return kept
        # Outside the handler, so the half-moved weights can go; the model is read from disk
        # the next time.
        del kept, held
        self._release()
        raise ModelLoadError(
            f"Model `{entry.public_name}` could not be moved back to {self.device} ({failed})."
        )

    def share_checker(self, pipe: Any) -> None:
        """Give `pipe` the shared safety checker instead of its own (the first becomes it)."""
        own = getattr(pipe, "safety_checker", None)
        if own is None:
            return
        if self.safety_checker is None:
            extractor = getattr(pipe, "feature_extractor", None)
            if extractor is None:
                return  # a checker without its preprocessing cannot check other models
            self.safety_checker = own
            self.feature_extractor = extractor
        elif own is not self.safety_checker:
            pipe.register_modules(safety_checker=self.safety_checker)

    def forget(self, name: str | None) -> bool:
        """Drop `name` (None: everything, the shared checker too) from the RAM tier; whether
        it held something."""
        if name is not None:
            held = self.ram.take(name) is not None
        else:
            held = bool(self.ram.names())
            held_spare = self.ram.spare > 0
            self.ram.clear()
            self.safety_checker = self.feature_extractor = None
            held = held or held_spare
        if held:
            self._release()
        return held
