"""Stable Diffusion on one device: load a model by source string, turn requests into images.

Synchronous on purpose: the bot calls it from a single dedicated GPU worker thread,
so there is no locking here and at most one pipeline call runs at a time.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bot.errors import GenerationFailed, JobCancelled, ModelLoadError, SettingsError
from bot.jobs import GenerationRequest
from bot.tiny_model import ensure_tiny_model

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Hub ids are exactly "owner/name"; anything else that does not exist on disk is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _hub_error_message(source: str, exc: BaseException) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain = _exception_chain(exc)
    # diffusers wraps everything in one OSError; the root cause says which fix applies.
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (
            f"Model `{source}` is gated on the Hugging Face Hub. Accept its license on "
            f"https://huggingface.co/{source} and log in on this machine with `hf auth login`, "
            "then try again."
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (
            f"Model `{source}` was not found on the Hugging Face Hub. Check the spelling "
            "(it looks like `owner/name`), or log in with `hf auth login` if it is private."
        )
    offline = any(
        isinstance(
            e,
            (
                OfflineModeIsEnabled,
                LocalEntryNotFoundError,
                ConnectionError,
                TimeoutError,
            ),
        )
        or type(e).__name__ in {"ConnectError", "ConnectTimeout", "gaierror"}
        for e in chain
    )
    if offline or "not fully cached locally" in str(exc) or "cached snapshot" in str(exc):
        return (
            f"Model `{source}` is not downloaded yet and the Hugging Face Hub cannot be reached. "
            "Connect this machine to the internet once so it can be downloaded (it is cached "
            f"after that), or download it elsewhere with `hf download {source} --local-dir "
            "<folder>` and set the model source to that local folder."
        )
    return (
        f"Model `{source}` could not be loaded from the Hugging Face Hub ({_short(exc)}). "
        "Check the id, or download it and set the model source to the local folder."
    )


class Engine:
    """Holds one loaded pipeline at a time and runs txt2img on it."""

    def __init__(self, *, device: str = "auto", dtype: str = "auto", cache_dir: Path) -> None:
        self.device: torch.device = resolve_device(device)
        self.dtype: torch.dtype = resolve_dtype(dtype, self.device)
        self.cache_dir = Path(cache_dir)
        self._source: str | None = None
        self._pipe: Any = None

    @property
    def loaded_source(self) -> str | None:
        return self._source

    def load(self, source: str) -> Any:
        """Return the StableDiffusionPipeline for `source`; loads it unless it is already loaded."""
        if self._pipe is not None and source == self._source:
            return self._pipe
        # Reject bad sources before touching the loaded model, so a typo costs nothing.
        location, local = self._resolve(source)
        # Free the old model before loading the new one: two SD models may not fit in VRAM.
        self.unload()
        pipe = self._from_pretrained(source, location, local=local)
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe.to(self.device)
        except Exception as exc:
            del pipe
            self._free_memory()
            raise ModelLoadError(
                f"Model `{source}` loaded but could not be moved to {self.device} ({_short(exc)})."
            ) from exc
        self._pipe = pipe
        self._source = source
        log.info("loaded model %s on %s as %s", source, self.device, self.dtype)
        return pipe

    def unload(self) -> None:
        if self._pipe is None:
            return
        log.info("unloading model %s", self._source)
        self._pipe = None
        self._source = None
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _resolve(self, source: str) -> tuple[str, bool]:
        """Map a source to (what to pass to from_pretrained, whether it is a local folder)."""
        source = source.strip()
        if source == BUILTIN_TINY:
            try:
                return str(ensure_tiny_model(self.cache_dir)), True
            except Exception as exc:
                raise ModelLoadError(
                    f"Could not build the built-in tiny model in `{self.cache_dir}` "
                    f"({_short(exc)})."
                ) from exc
        if source.lower().endswith(_SINGLE_FILE_SUFFIXES):
            raise ModelLoadError(
                f"`{source}` is a single-file checkpoint; single-file checkpoints are not "
                "supported yet. Use a diffusers model folder (with model_index.json) or a Hub id."
            )
        path = Path(source).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelLoadError(f"`{source}` is a file, not a diffusers model folder.")
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"`{path}` is not a diffusers model folder: it has no model_index.json."
                )
            return str(path), True
        # An existing folder wins over a Hub id of the same spelling (e.g. `models/sd15`).
        if _HUB_ID.match(source):
            return source, False
        if source.startswith("builtin:"):
            raise ModelLoadError(
                f"Unknown built-in model `{source}`; the only one is `{BUILTIN_TINY}`."
            )
        raise ModelLoadError(
            f"No model folder exists at `{path.absolute()}`. Point the model source at an existing "
            f"diffusers folder, a Hugging Face id like `owner/name`, or `{BUILTIN_TINY}`."
        )

    def _from_pretrained(self, source: str, location: str, *, local: bool) -> Any:
        # Lazy: importing diffusers takes seconds, and only the worker thread needs it.
        from diffusers import StableDiffusionPipeline

        pipeline_cls: Any = StableDiffusionPipeline  # unannotated in diffusers
        try:
            # local_files_only: a local folder (builtin:tiny included) must never hit the network.
            return pipeline_cls.from_pretrained(location, dtype=self.dtype, local_files_only=local)
        except Exception as exc:
            if not local:
                log.warning("loading hub model %s failed: %s", source, _short(exc, 400))
                raise ModelLoadError(_hub_error_message(source, exc)) from exc
            log.exception("loading local model %s failed", source)
            raise ModelLoadError(
                f"Could not load the model folder `{location}` ({_short(exc)}). "
                "Is it a complete Stable Diffusion 1.x/2.x diffusers folder?"
            ) from exc

    def native_size(self, source: str) -> tuple[int, int]:
        """(width, height) the model was trained at; other sizes work but may look worse."""
        pipe = self.load(source)
        sample = pipe.unet.config.sample_size
        scale = int(pipe.vae_scale_factor)
        # diffusers stores sample_size as an int or as (height, width).
        height, width = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
        return int(width) * scale, int(height) * scale

    def txt2img(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Generate images for `request`. JobCancelled from `on_step` propagates; anything else
        the pipeline raises becomes GenerationFailed."""
        pipe = self.load(request.model)

        def step_end(
            pipeline: Any, step_index: int, timestep: Any, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            if on_step is not None:
                # The pipeline's own count, not request.steps: some schedulers (PNDM) add a step.
                on_step(step_index + 1, int(pipeline.num_timesteps))
            return kwargs

        # A CPU generator makes a seed produce the same image on CUDA, MPS and CPU.
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        try:
            with torch.inference_mode():
                result = pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt.strip() or None,
                    width=request.width,
                    height=request.height,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance,
                    generator=generator,
                    output_type="pil",
                    callback_on_step_end=step_end,
                )
        except JobCancelled:
            self._after_failure()
            raise
        except torch.OutOfMemoryError as exc:
            self._after_failure()
            raise GenerationFailed(
                f"Ran out of GPU memory at {request.width}x{request.height}; try a smaller size."
            ) from exc
        except Exception as exc:
            self._after_failure()
            log.exception("generation failed for model %s", request.model)
            raise GenerationFailed(
                "Image generation failed unexpectedly. Try again, or with different settings."
            ) from exc
        return [image if image.mode == "RGB" else image.convert("RGB") for image in result.images]

    def _after_failure(self) -> None:
        # Tensors from the aborted run linger until collected; release them before the next job.
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
