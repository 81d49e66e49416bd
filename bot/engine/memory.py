"""Memory decides: what the device has free, how many images fit in one batch, whether another
model may stay loaded, and the RAM tier that keeps evicted models in CPU RAM.

Free memory comes from a `MemoryProbe` (CUDA's `mem_get_info` plus the blocks torch has cached
but not used; tests inject their own). Devices without one (CPU, MPS) are limited by the
settings only. The estimates here err on the high side; what they miss, the engine's
out-of-memory recovery (split the batch, tile the VAE decode) catches.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger(__name__)

MB = 2**20
GB = 2**30

#: A batch never takes more than this share of the free memory; the rest absorbs what the
#: estimate misses (text encoders, schedulers, fragmentation).
_BATCH_SHARE = 0.8


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes the next allocations can use (free on the device plus torch's cached, unused
    blocks), and the device's total."""

    free: int
    total: int


#: Measures the device's memory now; called on the GPU thread.
MemoryProbe = Callable[[], MemoryInfo]


def cuda_probe(device: torch.device) -> MemoryProbe | None:
    """The probe of a CUDA device; None elsewhere (no device memory to decide by)."""
    if device.type != "cuda":
        return None

    def probe() -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(device)
        # Blocks torch reserved but does not use are free for torch's next allocations.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MemoryInfo(free=int(free) + int(cached), total=int(total))

    return probe


def memory_stats(device: torch.device) -> dict[str, float]:
    """Allocated and reserved MB on a CUDA device (torch's caching allocator); 0s elsewhere."""
    if device.type != "cuda":
        return {"allocated_mb": 0.0, "reserved_mb": 0.0}
    return {
        "allocated_mb": torch.cuda.memory_allocated(device) / MB,
        "reserved_mb": torch.cuda.memory_reserved(device) / MB,
    }


def working_margin(total: int) -> int:
    """Memory kept free beside the loaded models for one image's run (activations, the VAE
    decode): another model stays loaded only while this much remains."""
    return max(2 * GB, total // 10)


def image_bytes(width: int, height: int, *, cfg: bool, dtype: torch.dtype, xl: bool) -> int:
    """Activation memory of one more image in a batched UNet call, estimated high.

    ComfyUI's estimate for PyTorch attention (latent area x copies x dtype size x 0.01 MB,
    times a per-family factor) with a 1.5 safety factor.
    """
    area = (width // 8) * (height // 8) * (2 if cfg else 1)
    factor = 0.8 if xl else 1.0
    size = torch.finfo(dtype).bits // 8
    return int(area * size * 0.01 * factor * 1.5 * MB)


def decode_bytes(width: int, height: int, *, dtype: torch.dtype) -> int:
    """Peak memory of decoding one image with the VAE, untiled (ComfyUI's estimate); the
    engine decodes one image at a time, so it does not grow with the batch."""
    size = torch.finfo(dtype).bits // 8
    return 2178 * (width // 8) * (height // 8) * 64 * size


def batch_images(free: int, *, per_image: int, reserve: int) -> int:
    """Images that fit in `free` bytes after `reserve`, at least 1 (a lone image that does
    not fit is the out-of-memory recovery's to handle)."""
    usable = int(free * _BATCH_SHARE) - reserve
    return max(1, usable // max(1, per_image))


def _tensor_sizes(modules: Iterator[torch.nn.Module]) -> Iterator[int]:
    """Bytes of each weight and buffer of `modules`, each tensor once (modules share some)."""
    seen: set[int] = set()
    for module in modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor.numel() * tensor.element_size()


def module_bytes(modules: Iterator[torch.nn.Module]) -> int:
    """Weights and buffers of `modules`, each tensor counted once."""
    return sum(_tensor_sizes(modules))


def pipeline_modules(pipe: Any, *, skip: object = None) -> Iterator[torch.nn.Module]:
    """The torch modules of a pipeline, less `skip` (a module it shares with others)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not skip:
            yield component


def move_modules(pipe: Any, device: torch.device, *, skip: object = None) -> None:
    """Move the pipeline's modules (less `skip`) to `device`; to pinned memory when leaving a
    CUDA device for the CPU, so that moving back is a fast asynchronous copy."""
    for module in pipeline_modules(pipe, skip=skip):
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        if device.type == "cpu" and first is not None and first.is_cuda:
            _to_pinned(module)
        else:
            # From pinned memory to the device the copy is asynchronous (later kernels on the
            # stream wait for it).
            module.to(device, non_blocking=True)


def _to_pinned(module: torch.nn.Module) -> None:
    """The module's tensors from the device straight into pinned RAM: one copy each (not to
    pageable RAM and then again to pinned)."""
    pinning = True
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if not tensor.is_cuda:
            continue
        if pinning:
            try:
                pinned = torch.empty_like(tensor, device="cpu", pin_memory=True)
            except RuntimeError as exc:  # e.g. a container's locked-memory limit
                log.warning(
                    "could not pin model weights in RAM (%s); switching back will be slower", exc
                )
                pinning = False
        if not pinning:
            pinned = torch.empty_like(tensor, device="cpu")
        # Blocking: the CPU copy must be complete before the device memory is reused.
        tensor.data = pinned.copy_(tensor.data)


def pinned_bytes(size: int) -> int:
    """RAM a pinned tensor of `size` bytes takes: torch's caching host allocator rounds each
    allocation up to a power of two (CachingHostAllocator.h, torch 2.13), so a model's
    pinned copy can take up to twice its weights."""
    return 1 << max(0, size - 1).bit_length() if size > 0 else 0


def ram_bytes(modules: Iterator[torch.nn.Module], *, pinned: bool) -> int:
    """RAM the tensors of `modules` take in the RAM tier, each tensor counted once: with
    `pinned`, as the caching host allocator rounds them."""
    return sum(pinned_bytes(size) if pinned else size for size in _tensor_sizes(modules))


def release_pinned() -> None:
    """Give the pinned blocks torch's caching host allocator keeps after their tensors are
    freed (a model moved back to the device, or dropped from the RAM tier) back to the OS;
    otherwise the tier's RAM is never returned. CUDA builds only."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


T = TypeVar("T")


class RamTier(Generic[T]):
    """Evicted models kept in CPU RAM within a budget, the least recently evicted dropped
    first when a new one needs room. Holds whatever the loader stores (its loaded model)."""

    def __init__(self, budget_mb: int) -> None:
        self.budget = max(0, budget_mb) * MB
        self._items: OrderedDict[str, tuple[T, int]] = OrderedDict()
        #: Pinned bytes that models moved back to the device left in torch's host cache, kept
        #: for the next eviction: pinning fresh RAM costs about half a second per GB, reusing
        #: pinned blocks nothing. Counted against the budget beside the models.
        self.spare = 0

    @property
    def used(self) -> int:
        return sum(size for _, size in self._items.values())

    def names(self) -> list[str]:
        """Models in the tier, least recently evicted first."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def fits(self, size: int) -> bool:
        return 0 < size <= self.budget

    def crowded(self, size: int) -> bool:
        """Whether `size` more bytes would only fit with the spare blocks given back."""
        return self.spare > 0 and self.used + self.spare + size > self.budget

    def put(self, name: str, item: T, size: int) -> list[str]:
        """Keep `item` (`size` bytes), which reused spare blocks first; returns the names
        dropped to make room for it."""
        dropped: list[str] = []
        self._items.pop(name, None)
        self.spare = max(0, self.spare - size)
        while self._items and self.used + self.spare + size > self.budget:
            dropped.append(self._items.popitem(last=False)[0])
        self._items[name] = (item, size)
        return dropped

    def take(self, name: str) -> tuple[T, int] | None:
        """Remove `name` and return its item and size (None when the tier does not hold it)."""
        return self._items.pop(name, None)

    def clear(self) -> None:
        self._items.clear()
        self.spare = 0
