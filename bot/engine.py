"""Stable Diffusion on one device: the model catalog's pipelines, turned into images.

Synchronous on purpose: the bot calls it from a single dedicated GPU worker thread, so there
is no locking here and at most one pipeline call runs at a time.

One loaded model serves all three modes: img2img and inpaint pipelines are derived from the
txt2img one with `from_pipe`, sharing its UNet, VAE and text encoder (no second copy in
memory). A batch of compatible requests (equal `batch_key()`) runs as one pipeline call with
one CPU generator per image, and image i of the batch is the image a solo run with its seed
gives (see `Engine.exact_batches`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from bot.catalog import BUILTIN_TINY, BUILTIN_TINY_INPAINT, Catalog, ModelEntry
from bot.errors import (
    GenerationFailed,
    GpuOutOfMemory,
    InvalidRequest,
    ModelLoadError,
    SdbotError,
    SettingsError,
)
from bot.jobs import GenerationRequest, LoraSpec
from bot.samplers import DEFAULT as DEFAULT_SCHEDULER
from bot.samplers import make_scheduler, scheduler_label
from bot.tiny_model import ensure_tiny_model

if TYPE_CHECKING:
    from bot.jobs import Mode

__all__ = [
    "BUILTIN_TINY",
    "Engine",
    "GenerationResult",
    "LoadRecord",
    "StepInfo",
    "latents_preview",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: The LoRA folder when no catalog is given; the same default as Settings.lora_dir.
DEFAULT_LORA_DIR = Path("data/loras")
#: LoRAs stay loaded (as inactive adapters) per model, so a popular one is not re-read each job.
MAX_CACHED_LORAS = 8
#: CLIP's context: 77 tokens = start + 75 + end. Longer prompts are encoded in 75-token chunks.
CHUNK_TOKENS = 75

# A1111's "Approx cheap" latent -> RGB factors for SD 1.x/2.x latents: a preview without the
# VAE (costs one tiny matrix product instead of a decoder pass).
_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


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


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# -- what the engine hands back -----------------------------------------------------------


@dataclass(frozen=True)
class LoadRecord:
    """One model load attempt, reported to `Engine.on_load` (the executor stores it)."""

    model: str
    source: str
    ok: bool
    seconds: float
    memory_mb: float | None
    error: str | None


@dataclass(frozen=True)
class StepInfo:
    """Progress of one pipeline call, passed to `on_step` after every denoising step."""

    step: int
    total: int
    # Per request of the call: (latents of the running batch, row of its first image), or
    # None while that request waits for a later pipeline call of the same generate().
    _rows: tuple[tuple[Any, int] | None, ...] = field(default=(), repr=False, compare=False)
    _latent_size: tuple[int, int] = field(default=(8, 8), repr=False, compare=False)

    def preview(self, index: int) -> Image.Image:
        """A small, cheap preview of request `index`'s first image at this step.

        Computed only when called (a fixed linear map of the latents, no VAE); the image is
        1/8 of the final size. Call it from `on_step`, on the GPU thread.
        """
        source = self._rows[index]
        if source is None:
            width, height = self._latent_size
            return Image.new("RGB", (width, height), (128, 128, 128))
        latents, row = source
        return latents_preview(latents[row])


@dataclass
class GenerationResult:
    """The images of one request, in seed order."""

    images: list[Image.Image]
    seeds: list[int]
    #: Per image: flagged by the model's safety checker (all False when it has none).
    #: Images are returned unaltered; the front end blurs, spoilers or blocks by policy.
    nsfw: list[bool]
    #: The A1111 sampler name for the PNG `Sampler:` field.
    sampler: str


def latents_preview(latents: torch.Tensor) -> Image.Image:
    """RGB approximation of one image's SD latents (4 x h x w) -> an h x w PIL image."""
    lat = latents.detach()[:4].float().cpu()
    factors = torch.tensor(_LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", lat, factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


# -- loaded models --------------------------------------------------------------------------


@dataclass(eq=False)
class _Loaded:
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


@dataclass(frozen=True)
class _Prepared:
    """A request's text embeddings: (1, tokens, dim) each; negative is None without CFG."""

    positive: torch.Tensor
    negative: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.positive.shape[1])


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
    ) -> None:
        self.device: torch.device = resolve_device(device)
        self.dtype: torch.dtype = resolve_dtype(dtype, self.device)
        self.cache_dir = Path(cache_dir)
        self.catalog = catalog if catalog is not None else Catalog.load(None, DEFAULT_LORA_DIR)
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise SettingsError(f"max_loaded must be at least 1, got {max_loaded!r}.")
        self.max_loaded = max_loaded
        #: Called on the GPU thread after every load attempt; may be set after construction.
        self.on_load = on_load
        #: Run the UNet once per image inside a batched call, so a batched image is
        #: bit-identical to a solo run with its seed. Kernels pick other summation orders for
        #: other batch sizes (on CPU the UNet's output moves by ~2e-6, which flips ~10 of
        #: 196,608 pixel values by one level at 256px), so this is on by default on CPU/MPS;
        #: on CUDA the batched UNet is the point of batching, and images then match solo runs
        #: to within rounding. The VAE and text encoder always run one image at a time.
        self.exact_batches = self.device.type != "cuda" if exact_batches is None else exact_batches
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        self._adapter_ids = itertools.count(1)

    # -- loading ------------------------------------------------------------------------------

    @property
    def loaded_models(self) -> list[str]:
        """Catalog names of the loaded models, least recently used first."""
        return list(self._models)

    @property
    def loaded_source(self) -> str | None:
        """Source of the most recently used model (None when nothing is loaded)."""
        if not self._models:
            return None
        return next(reversed(self._models.values())).entry.source

    def is_loaded(self, model: str) -> bool:
        try:
            return self.catalog.resolve(model).name in self._models
        except InvalidRequest:
            return False

    def load(self, model: str) -> Any:
        """The txt2img pipeline of `model` (a catalog name or a source), loading it if needed."""
        return self._ensure(model).base

    def pipeline(self, model: str, mode: Mode) -> Any:
        """The pipeline for `mode`; all modes of a model share one set of weights."""
        return self._pipeline(self._ensure(model), mode)

    def unload(self, model: str | None = None) -> None:
        """Free one model (or all of them)."""
        names = list(self._models) if model is None else [self.catalog.resolve(model).name]
        for name in names:
            if self._models.pop(name, None) is not None:
                log.info("unloaded model %s", name)
        self._free_memory()

    def native_size(self, source: str) -> tuple[int, int]:
        """(width, height) the model was trained at; other sizes work but may look worse."""
        pipe = self.load(source)
        sample = pipe.unet.config.sample_size
        scale = int(pipe.vae_scale_factor)
        # diffusers stores sample_size as an int or as (height, width).
        height, width = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
        return int(width) * scale, int(height) * scale

    def _ensure(self, model: str) -> _Loaded:
        entry = self.catalog.resolve(model)
        loaded = self._models.get(entry.name)
        if loaded is not None:
            self._models.move_to_end(entry.name)
            return loaded
        started = time.perf_counter()
        try:
            # Reject bad sources before evicting anything, so a typo costs nothing.
            kind, location = self._locate(entry)
            while len(self._models) >= self.max_loaded:
                # Free before loading: two SD models may not fit in VRAM together.
                name, _ = self._models.popitem(last=False)
                log.info("evicting model %s to make room for %s", name, entry.name)
                self._free_memory()
            pipe = self._load_pipeline(entry, kind, location)
        except ModelLoadError as exc:
            self._report(entry, started, ok=False, memory_mb=None, error=exc.message)
            raise
        loaded = _Loaded(entry, pipe, dict(pipe.scheduler.config))
        self._models[entry.name] = loaded
        memory = _module_megabytes(pipe)
        self._report(entry, started, ok=True, memory_mb=memory, error=None)
        log.info(
            "loaded model %s (%s) on %s as %s: %.0f MB",
            entry.name,
            entry.source,
            self.device,
            self.dtype,
            memory,
        )
        return loaded

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

    def _locate(self, entry: ModelEntry) -> tuple[str, str]:
        """(kind, location): kind is "folder", "hub" or "single_file"."""
        source = entry.source.strip()
        if source in (BUILTIN_TINY, BUILTIN_TINY_INPAINT):
            try:
                folder = ensure_tiny_model(
                    self.cache_dir, inpainting=source == BUILTIN_TINY_INPAINT
                )
            except Exception as exc:
                raise ModelLoadError(
                    f"Could not build the built-in tiny model in `{self.cache_dir}` "
                    f"({_short(exc)})."
                ) from exc
            return "folder", str(folder)
        if source.startswith("builtin:"):
            raise ModelLoadError(
                f"Unknown built-in model `{source}`; the built-in ones are `{BUILTIN_TINY}` "
                f"and `{BUILTIN_TINY_INPAINT}`."
            )
        path = Path(source).expanduser()
        if entry.is_single_file:
            if not path.is_file():
                raise ModelLoadError(
                    f"The checkpoint file `{path.absolute()}` of model `{entry.name}` does not "
                    "exist. Fix its `source` in the model catalog."
                )
            if entry.config is not None:
                config = Path(entry.config).expanduser()
                if not (config / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"The `config` folder `{config}` of model `{entry.name}` is not a "
                        "diffusers folder (no model_index.json). Point it at a diffusers copy "
                        "of the same architecture, e.g. `hf download "
                        "stable-diffusion-v1-5/stable-diffusion-v1-5 --exclude '*.safetensors' "
                        "'*.bin' --local-dir <folder>`."
                    )
            return "single_file", str(path)
        if path.exists():
            if not path.is_dir():
                raise ModelLoadError(f"`{source}` is a file, not a diffusers model folder.")
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"`{path}` is not a diffusers model folder: it has no model_index.json."
                )
            return "folder", str(path)
        # An existing folder wins over a Hub id of the same spelling (e.g. `models/sd15`).
        if re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$", source):
            return "hub", source
        raise ModelLoadError(
            f"No model folder exists at `{path.absolute()}`. Point the model source at an existing "
            f"diffusers folder, a Hugging Face id like `owner/name`, or `{BUILTIN_TINY}`."
        )

    def _load_pipeline(self, entry: ModelEntry, kind: str, location: str) -> Any:
        # Lazy: importing diffusers takes seconds, and only the worker thread needs it.
        import diffusers.utils.logging
        import transformers.utils.logging
        from diffusers import StableDiffusionPipeline

        # Their per-file progress bars garble the bot's log and the shell; we log the load.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        pipeline_cls: Any = StableDiffusionPipeline  # unannotated in diffusers
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
                pipe = pipeline_cls.from_pretrained(
                    location, dtype=self.dtype, local_files_only=kind == "folder"
                )
        except Exception as exc:
            if kind == "hub":
                log.warning("loading hub model %s failed: %s", entry.source, _short(exc, 400))
                raise ModelLoadError(_hub_error_message(entry.source, exc)) from exc
            log.exception("loading model %s from %s failed", entry.name, location)
            if kind == "single_file":
                hint = (
                    "Is it a Stable Diffusion 1.x/2.x checkpoint, and does `config` describe the "
                    "same architecture?"
                    if entry.config
                    else "Without a `config` folder in the catalog its configs come from the Hub, "
                    "which needs the internet once; or set `config` to a local diffusers folder "
                    "of the same architecture."
                )
                raise ModelLoadError(
                    f"Could not load the checkpoint `{location}` ({_short(exc)}). {hint}"
                ) from exc
            raise ModelLoadError(
                f"Could not load the model folder `{location}` ({_short(exc)}). "
                "Is it a complete Stable Diffusion 1.x/2.x diffusers folder?"
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe.to(self.device)
        except Exception as exc:
            del pipe
            self._free_memory()
            if _is_oom(exc):
                raise ModelLoadError(
                    f"Model `{entry.name}` does not fit in the memory of {self.device}. Lower "
                    "SDBOT_MAX_LOADED_MODELS, use SDBOT_DTYPE=float16, or pick a smaller model."
                ) from exc
            raise ModelLoadError(
                f"Model `{entry.name}` loaded but could not be moved to {self.device} "
                f"({_short(exc)})."
            ) from exc
        return pipe

    def _pipeline(self, loaded: _Loaded, mode: str) -> Any:
        # An inpainting UNet (9 input channels) cannot run the plain pipelines: every mode goes
        # through the inpainting pipeline (txt2img = everything masked over a blank image).
        key = "inpaint" if loaded.inpainting_unet else mode
        if key == "txt2img":
            return loaded.base
        pipe = loaded.pipes.get(key)
        if pipe is None:
            import diffusers

            cls: Any = (
                diffusers.StableDiffusionInpaintPipeline
                if key == "inpaint"
                else diffusers.StableDiffusionImg2ImgPipeline
            )
            # Built from the base pipeline's components: the very same module objects, so no
            # weights are copied. (Not from_pipe: it casts the shared modules to its `dtype`
            # argument, float32 by default, which would turn a float16 model into float32.)
            base = loaded.base
            pipe = cls(
                **base.components,
                requires_safety_checker=bool(base.config.get("requires_safety_checker", False)),
            )
            pipe.set_progress_bar_config(disable=True)
            loaded.pipes[key] = pipe
        return pipe

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation ---------------------------------------------------------------------------

    def txt2img(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """The images of one request (any mode); `on_step(step, total)` after each step."""
        callback = None if on_step is None else (lambda info: on_step(info.step, info.total))
        return self.generate([request], on_step=callback)[0].images

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
        if not requests:
            return []
        first = requests[0]
        key = first.batch_key()
        if any(r.batch_key() != key for r in requests[1:]):
            raise InvalidRequest("These requests cannot share a batch (their settings differ).")
        loaded = self._ensure(first.model)
        pipe = self._pipeline(loaded, first.mode)
        try:
            # Fresh each call: schedulers keep per-run state, which a cancelled run would leak.
            scheduler = make_scheduler(first.scheduler, loaded.scheduler_config)
        except SdbotError:
            raise
        except Exception as exc:
            log.exception("scheduler %s failed for %s", first.scheduler, loaded.entry.name)
            raise GenerationFailed(
                f"The {first.scheduler} sampler does not work with model {loaded.entry.name}; "
                "pick another sampler."
            ) from exc
        pipe.scheduler = scheduler
        sampler = (
            scheduler_label(scheduler) if first.scheduler == DEFAULT_SCHEDULER else first.scheduler
        )
        try:
            self._apply_loras(loaded, first.loras)
            self._load_embeddings(loaded, requests)
            with torch.inference_mode():
                images, nsfw = self._run(pipe, requests, on_step)
        except SdbotError:  # JobCancelled from on_step, InvalidRequest for a LoRA, ...
            self._after_failure()
            raise
        except Exception as exc:
            self._after_failure()
            if _is_oom(exc):
                size = f"{first.width}x{first.height}"
                raise GpuOutOfMemory(
                    f"Ran out of GPU memory making {sum(r.count for r in requests)} image(s) "
                    f"at {size}; try fewer images or a smaller size."
                ) from exc
            log.exception("generation failed for model %s", first.model)
            raise GenerationFailed(
                "Image generation failed unexpectedly. Try again, or with different settings."
            ) from exc
        finally:
            if first.loras:
                # The next request without LoRAs must get the plain model.
                with contextlib.suppress(Exception):
                    loaded.base.disable_lora()
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

    def _run(
        self,
        pipe: Any,
        requests: Sequence[GenerationRequest],
        on_step: Callable[[StepInfo], None] | None,
    ) -> tuple[list[Image.Image], list[bool]]:
        first = requests[0]
        cfg = first.guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        prepared = [self._encode(pipe, r, cfg=cfg) for r in requests]
        # Requests whose prompts need a different number of 77-token chunks cannot share a
        # call without padding one of them (which would change its image): one call per size.
        groups: dict[int, list[int]] = {}
        for index, p in enumerate(prepared):
            groups.setdefault(p.tokens, []).append(index)
        starts = list(itertools.accumulate((r.count for r in requests), initial=0))
        latent_size = (first.width // 8, first.height // 8)
        rows: list[tuple[Any, int] | None] = [None] * len(requests)
        latents_by_request: dict[int, torch.Tensor] = {}
        for number, members in enumerate(groups.values()):

            def step_end(
                pipeline: Any,
                step_index: int,
                timestep: Any,
                kwargs: dict[str, Any],
                members: list[int] = members,
                number: int = number,
            ) -> dict[str, Any]:
                if on_step is not None:
                    latents = kwargs["latents"]
                    row = 0
                    for index in members:
                        rows[index] = (latents, row)
                        row += requests[index].count
                    per_call = int(pipeline.num_timesteps)
                    on_step(
                        StepInfo(
                            step=number * per_call + step_index + 1,
                            total=per_call * len(groups),
                            _rows=tuple(rows),
                            _latent_size=latent_size,
                        )
                    )
                return kwargs

            latents = self._call(pipe, [requests[i] for i in members], prepared, members, step_end)
            row = 0
            for index in members:
                n = requests[index].count
                latents_by_request[index] = latents[row : row + n]
                rows[index] = (latents, row)  # finished: previews show its last latents
                row += n
        images: list[Image.Image] = []
        for index in range(len(requests)):
            images.extend(self._decode(pipe, latents_by_request[index]))
        assert len(images) == starts[-1]
        return images, self._nsfw(pipe, images)

    def _call(
        self,
        pipe: Any,
        requests: list[GenerationRequest],
        prepared: list[_Prepared],
        members: list[int],
        step_end: Callable[..., dict[str, Any]],
    ) -> torch.Tensor:
        """One pipeline call for `requests` (same batch key and prompt length) -> latents."""
        first = requests[0]
        positive: list[torch.Tensor] = []
        negative: list[torch.Tensor] = []
        generators: list[torch.Generator] = []
        for request, index in zip(requests, members, strict=True):
            p = prepared[index]
            for seed in request.seeds:
                positive.append(p.positive)
                if p.negative is not None:
                    negative.append(p.negative)
                # A CPU generator per image: the same seed gives the same image on any device
                # and at any position in any batch.
                generators.append(torch.Generator(device="cpu").manual_seed(seed))
        kwargs: dict[str, Any] = {
            "prompt_embeds": torch.cat(positive),
            "negative_prompt_embeds": torch.cat(negative) if negative else None,
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "generator": generators,
            "output_type": "latent",
            "callback_on_step_end": step_end,
        }
        size = (first.width, first.height)
        if "mask_image" in _call_parameters(pipe):
            # The inpainting pipeline: inpaint, or any mode on an inpainting (9-channel) UNet.
            images: list[Image.Image] = []
            masks: list[Image.Image] = []
            for request in requests:
                image, mask = _inpaint_inputs(request, size)
                images += [image] * request.count
                masks += [mask] * request.count
            strength = 1.0 if first.mode == "txt2img" else first.strength
            kwargs.update(image=images, mask_image=masks, strength=strength)
        elif first.mode == "img2img":
            images = []
            for request in requests:
                assert request.init_image is not None
                images += [_sized(request.init_image, size, "RGB")] * request.count
            kwargs.update(image=images, strength=first.strength)
        with _per_image_unet(pipe.unet, len(generators), enabled=self.exact_batches):
            result = pipe(**kwargs)
        latents: torch.Tensor = result.images
        return latents

    def _decode(self, pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
        # One image at a time: a batch-size-independent result, and the VAE's peak memory
        # (the largest of the whole run at 512px and up) stays that of a single image.
        out: list[Image.Image] = []
        scale = float(pipe.vae.config.scaling_factor)
        for i in range(latents.shape[0]):
            decoded = pipe.vae.decode(latents[i : i + 1] / scale, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
            out.append(pil if pil.mode == "RGB" else pil.convert("RGB"))
        return out

    def _nsfw(self, pipe: Any, images: list[Image.Image]) -> list[bool]:
        checker = getattr(pipe, "safety_checker", None)
        extractor = getattr(pipe, "feature_extractor", None)
        if checker is None or extractor is None or not images:
            return [False] * len(images)
        import numpy as np

        features = extractor(images, return_tensors="pt").pixel_values
        features = features.to(device=self.device, dtype=self.dtype)
        # The checker blacks out flagged images in place; give it a copy and keep ours, so
        # what to do with a flagged image stays the front end's (and the server's) choice.
        arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        _, flags = checker(images=arrays, clip_input=features)
        return [bool(flag) for flag in flags]

    def _after_failure(self) -> None:
        # Tensors from the aborted run linger until collected; release them before the next job.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- prompts --------------------------------------------------------------------------------

    def _encode(self, pipe: Any, request: GenerationRequest, *, cfg: bool) -> _Prepared:
        """Text embeddings for one request, one prompt at a time (batch-size independent).

        Prompts longer than CLIP's 75 tokens are not cut: they are encoded in 75-token chunks
        whose embeddings are concatenated (as AUTOMATIC1111 does); the negative prompt is
        padded with empty chunks to the same length.
        """
        negative_text = request.negative_prompt.strip()
        chunks = _chunks(pipe, request.prompt)
        negative_chunks = _chunks(pipe, negative_text) if cfg else [[]]
        if len(chunks) == 1 and len(negative_chunks) == 1:
            # The pipeline's own encoder: a short prompt is encoded exactly as diffusers does.
            positive, negative = pipe.encode_prompt(
                request.prompt,
                self.device,
                1,
                cfg,
                negative_text or None,
            )
            return _Prepared(positive, negative if cfg else None)
        n = max(len(chunks), len(negative_chunks))
        positive = _encode_chunks(pipe, chunks, n, self.device)
        negative = _encode_chunks(pipe, negative_chunks, n, self.device) if cfg else None
        return _Prepared(positive, negative)

    # -- LoRAs and embeddings -------------------------------------------------------------------

    def _apply_loras(self, loaded: _Loaded, loras: tuple[LoraSpec, ...]) -> None:
        pipe = loaded.base
        if not loras:
            if loaded.loras:
                pipe.disable_lora()
            return
        adapters: list[str] = []
        for spec in loras:
            path = self.catalog.lora_path(spec.name)
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = loaded.loras.get(spec.name)
            if cached is not None and cached[1] != stamp:
                # The file was replaced: drop the old weights.
                self._delete_adapter(loaded, spec.name)
                cached = None
            if cached is None:
                adapter = f"sdbot_lora_{next(self._adapter_ids)}"
                try:
                    with _quiet_peft():
                        pipe.load_lora_weights(str(path), adapter_name=adapter)
                except Exception as exc:
                    log.warning("LoRA %s failed to load: %s", spec.name, _short(exc, 400))
                    with contextlib.suppress(Exception), _quiet_peft():
                        pipe.delete_adapters([adapter])
                    raise InvalidRequest(
                        f"The LoRA {spec.name!r} does not fit model {loaded.entry.name!r} (it "
                        "was probably made for another base model). Pick another LoRA or model."
                    ) from exc
                cached = (adapter, stamp)
            loaded.loras[spec.name] = cached
            loaded.loras.move_to_end(spec.name)
            adapters.append(cached[0])
        wanted = {spec.name for spec in loras}
        for name in list(loaded.loras):
            if len(loaded.loras) <= MAX_CACHED_LORAS:
                break
            if name not in wanted:
                self._delete_adapter(loaded, name)
        pipe.set_adapters(adapters, adapter_weights=[float(spec.weight) for spec in loras])
        pipe.enable_lora()

    def _delete_adapter(self, loaded: _Loaded, name: str) -> None:
        cached = loaded.loras.pop(name, None)
        if cached is not None:
            with contextlib.suppress(Exception), _quiet_peft():
                loaded.base.delete_adapters([cached[0]])

    def _load_embeddings(self, loaded: _Loaded, requests: Sequence[GenerationRequest]) -> None:
        """Load the textual-inversion embeddings the prompts mention (by file name), once."""
        available = [n for n in self.catalog.embeddings() if n not in loaded.embeddings]
        if not available:
            return
        text = "\n".join(f"{r.prompt}\n{r.negative_prompt}" for r in requests)
        for name in available:
            if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                continue
            # Tried once per model: a failure is logged and the word stays plain text.
            loaded.embeddings.add(name)
            try:
                loaded.base.load_textual_inversion(
                    str(self.catalog.embedding_path(name)), token=name
                )
                log.info("loaded embedding %s into %s", name, loaded.entry.name)
            except Exception as exc:
                log.warning(
                    "embedding %s does not fit model %s: %s",
                    name,
                    loaded.entry.name,
                    _short(exc, 300),
                )


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Several adapters per model and deleting inactive ones are the design, not mistakes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Already found a `peft_config`")
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        yield


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _sized(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """`image` in `mode` at `size` (the front end prepares both already; this is a backstop)."""
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _inpaint_inputs(
    request: GenerationRequest, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """(image, mask) for the inpainting pipeline; txt2img/img2img on an inpainting UNet mask
    everything (over a neutral grey image for txt2img)."""
    if request.mode == "inpaint":
        assert request.init_image is not None and request.mask_image is not None
        return _sized(request.init_image, size, "RGB"), _sized(request.mask_image, size, "L")
    if request.mode == "img2img":
        assert request.init_image is not None
        image = _sized(request.init_image, size, "RGB")
    else:
        image = Image.new("RGB", size, (127, 127, 127))
    return image, Image.new("L", size, 255)


def _chunks(pipe: Any, text: str) -> list[list[int]]:
    """The prompt's token ids (no start/end tokens) in chunks of CHUNK_TOKENS; at least one."""
    if not text:
        return [[]]
    # Multi-vector textual-inversion tokens expand to several ids, as in encode_prompt.
    converted = pipe.maybe_convert_prompt(text, pipe.tokenizer)
    ids: list[int] = pipe.tokenizer(
        converted, add_special_tokens=False, truncation=False, verbose=False
    ).input_ids
    chunks = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    return chunks or [[]]


def _encode_chunks(pipe: Any, chunks: list[list[int]], n: int, device: torch.device) -> Any:
    """Encode `chunks` (padded with empty ones to `n`) -> (1, 77 * n, dim) embeddings."""
    tokenizer = pipe.tokenizer
    length = CHUNK_TOKENS + 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for chunk in chunks + [[]] * (n - len(chunks)):
        ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
    config = pipe.text_encoder.config
    embeddings = []
    for ids in rows:  # one chunk per call, like the short path (batch-size independent)
        input_ids = torch.tensor([ids], device=device)
        mask = None
        if getattr(config, "use_attention_mask", False):
            mask = (input_ids != pad).long()
            mask[:, : ids.index(tokenizer.eos_token_id) + 1] = 1
        embeddings.append(pipe.text_encoder(input_ids, attention_mask=mask)[0])
    return torch.cat(embeddings, dim=1).to(dtype=pipe.text_encoder.dtype)


@contextlib.contextmanager
def _per_image_unet(unet: Any, images: int, *, enabled: bool) -> Iterator[None]:
    """While active, a UNet call on a batch runs once per image.

    The pipeline stacks [uncond_0..uncond_n-1, cond_0..cond_n-1]; image i's rows are
    (i, n + i), exactly the two rows a solo run feeds the UNet, so each per-image call is
    the solo call and its output is bit-identical to it.
    """
    if not enabled or images <= 1:
        yield
        return
    original = unet.forward

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        total = sample.shape[0]
        if total % images:
            return original(sample, *args, **kwargs)
        copies = total // images
        return_dict = kwargs.pop("return_dict", True)

        def pick(value: Any, index: torch.Tensor) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == total:
                # Indexing (unlike index_select) keeps the memory format: img2img latents are
                # channels-last, and convolutions take another (not bit-equal) kernel on a
                # contiguous copy.
                return value[index]
            return value

        out: torch.Tensor | None = None
        for i in range(images):
            index = torch.tensor([i + c * images for c in range(copies)], device=sample.device)
            result = original(
                pick(sample, index),
                *(pick(a, index) for a in args),
                return_dict=False,
                **{k: pick(v, index) for k, v in kwargs.items()},
            )[0]
            if out is None:
                # The solo output's layout too, so the next step's inputs match a solo run's.
                channels_last = (
                    result.ndim == 4
                    and not result.is_contiguous()
                    and result.is_contiguous(memory_format=torch.channels_last)
                )
                layout = torch.channels_last if channels_last else torch.contiguous_format
                out = torch.empty(
                    (total, *result.shape[1:]),
                    dtype=result.dtype,
                    device=result.device,
                    memory_format=layout,
                )
            out[index] = result
        assert out is not None
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward


def _module_megabytes(pipe: Any) -> float:
    """Weights and buffers of the pipeline's modules, each shared module counted once."""
    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in itertools.chain(component.parameters(), component.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total / 2**20
