"""Where the engine runs: device and dtype from the settings, out-of-memory detection, and
giving memory back after a model is dropped or a run fails.

The one place that knows how torch reports running out of memory; the engine turns such an
error into `bot.errors.GpuOutOfMemory` (or `ModelLoadError` while loading) after freeing
memory with `free_memory`, so callers only ever see the domain error.
"""

from __future__ import annotations

import gc

import torch

from bot.errors import SettingsError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
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
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp16 halves VRAM and is fast on CUDA; on CPU/MPS it is slow or unsupported for some ops.
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise SettingsError(
            f"dtype `{dtype}` is not supported; use auto, float32, float16 or bfloat16."
        ) from None


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is torch running out of device memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Give memory back after a model is dropped or a run fails.

    Tensors of a dropped model or an aborted run linger until collected; collect them, then
    hand CUDA's cached blocks back so the next load or job can use them.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
