"""Where the engine runs: device and dtype from the settings, the process-wide CUDA settings
(allocator, TF32), out-of-memory detection, and giving memory back after a model is dropped or
a run fails.

The one place that knows how torch reports running out of memory; the engine turns such an
error into `bot.errors.GpuOutOfMemory` (or `ModelLoadError` while loading) after freeing
memory with `free_memory`, so callers only ever see the domain error.
"""

from __future__ import annotations

import gc
import logging
import os

import torch

from bot.errors import SettingsError

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: The allocator setting we want unless the user chose their own (either variable name).
_ALLOC_CONF = "expandable_segments:True"
_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def use_expandable_segments() -> None:
    """Let CUDA's caching allocator grow segments instead of reserving fixed blocks, unless
    the user set an allocator config themselves.

    Fragmentation is what makes a batch that fits after a model switch or a 1024 px job fail
    with gigabytes "reserved but unallocated"; expandable segments avoid most of it. The
    allocator reads the variable when CUDA initialises (the first CUDA call, not `import
    torch`), so this runs when this module is imported: every engine process (the bot, a Serve
    replica, `sdbot generate`) imports it before touching CUDA, and no entry point has to
    remember to.
    """
    if any(name in os.environ for name in _ALLOC_VARS):
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _ALLOC_CONF
    if torch.cuda.is_initialized():  # someone used CUDA before importing the engine
        log.warning("CUDA was initialised before sdbot set %s; it has no effect", _ALLOC_CONF)


use_expandable_segments()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise SettingsError(
            f"device `{device}` is not a device name; use auto, cpu, cuda, cuda:N or mps."
        ) from exc
    # Fail at startup, not on the first job, when the configured device is absent.
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device `{device}` was requested but CUDA is not available here.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"device `{device}` was requested but MPS is not available here.")
    if resolved.type == "cuda" and resolved.index is None:
        # Some torch.cuda calls (set_per_process_memory_fraction) refuse a device without
        # an index; bare `cuda` is the first visible card.
        return torch.device("cuda", 0)
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype; `auto`: bf16 on CUDA cards with native bf16 (Ampere and later),
    fp16 on older CUDA cards, fp32 elsewhere."""
    if dtype == "auto":
        if device.type != "cuda":
            # On CPU/MPS half precision is slow or unsupported for some ops.
            return torch.float32
        # bf16 has fp32's range, so the VAE and attention do not overflow into black images
        # as fp16 can; emulated bf16 (pre-Ampere) is slow, so only native support counts.
        # The engine's device, not torch's current one (is_bf16_supported's): on a machine
        # with mixed cards they differ. ROCm cards all have it.
        if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        return torch.float16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise SettingsError(
            f"dtype `{dtype}` is not supported; use auto, float32, float16 or bfloat16."
        ) from None


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores.

    Every fp32 op the engine runs (the fp32 VAE re-decode, an fp32 model, the safety checker
    of an fp32 model) is then several times faster on Ampere and later, at a precision below
    anything an 8-bit image shows. Process-wide, as torch's flags are.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is torch running out of device memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Give memory back after a model is dropped or a run fails.

    Tensors of a dropped model or an aborted run linger until collected; collect them, then
    hand CUDA's cached blocks back so the next load or job can use them. Call it outside any
    `except` block: inside one, the exception's frames still hold the tensors of the failure.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
