"""Opt-in torch.compile of the denoiser and the VAE decoder (SDBOT_COMPILE=1).

Shapes: a compiled graph is specialised to its input shapes (`dynamic=False`: dynamic
spatial sizes would give slower generic kernels), and any size from 64 to 1024 in steps of 8
would otherwise mean a recompile (tens of seconds on a GPU) for nearly every new request. So
each model is compiled for a small set of size *buckets* only, by default its native size
(512x512 for SD 1.x, 1024x1024 for SDXL): a call at a bucket size runs the compiled graph, a
call at any other size runs the plain (eager) module, which gives the same image up to
rounding. Each new (batch, size) at a bucket compiles once, logged with its time; the number
of graphs per module is capped (`max_graphs`, then eager) and dynamo's recompile limit is
raised to fit, so a busy bot never hits dynamo's silent fallback. Dynamo's own recompile log
(`torch._logging` "recompiles") is switched on, so an unexpected recompile says why.

Warm-up: the first time a model's pipeline is prepared, one short generation per bucket runs
(and is logged with its time), so a preload at start-up pays the compile rather than the first
member. Other batch sizes compile on first use.

LoRAs: loading a LoRA injects peft layers into the UNet, which a graph compiled without them
cannot take, and fusing weights per call is impossible under a compiled module. The dispatcher
therefore runs the plain module whenever the UNet holds LoRA layers (from the first LoRA
loaded into that model until it is reloaded); the compiled graph is never touched by LoRA
apply or unapply, so nothing breaks it. channels_last is set on the compiled modules: the
faster layout for convolutions on CUDA.
"""

from __future__ import annotations

import logging
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bot.engine.decode import decode_latents
from bot.engine.device import is_oom
from bot.engine.loading import native_size
from bot.errors import without_frames

log = logging.getLogger(__name__)

#: Graphs per compiled module (distinct batch sizes x buckets) before the rest run eager.
MAX_GRAPHS = 16


class _Bucketed:
    """A module's forward: compiled at bucket sizes, the plain forward at any other."""

    def __init__(
        self,
        name: str,
        module: Any,
        original: Callable[..., Any],
        compiled: Callable[..., Any],
        sizes: set[tuple[int, int]],
        max_graphs: int,
    ) -> None:
        self.name = name
        self.module = weakref.ref(module)
        self.original = original
        self.compiled = compiled
        self.sizes = sizes  # (height, width) of the module's input, in latents
        self.max_graphs = max_graphs
        self.graphs: set[tuple[Any, ...]] = set()
        self.compiled_calls = 0
        self.eager_calls = 0

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        key = self._graph_for(sample)
        if key is None:
            self.eager_calls += 1
            return self.original(sample, *args, **kwargs)
        if key in self.graphs:
            self.compiled_calls += 1
            return self.compiled(sample, *args, **kwargs)
        start = time.perf_counter()
        failed = False
        try:
            out = self.compiled(sample, *args, **kwargs)
        except Exception as exc:
            if is_oom(exc):
                raise  # the batch is too big, not the compile broken: the engine splits it
            # A compile that fails (no C compiler, a Triton mismatch, OOM in autotuning) would
            # fail again on every later call: this module runs eager from now on. The eager
            # call runs outside the handler, so the failed attempt's frames are freed first;
            # the log gets the traceback as text, not the frames (a handler may keep records).
            self.sizes = set()
            failed = True
            log.warning(
                "compiling %s failed; it runs eager from now on: %s",
                self.name,
                "".join(traceback.format_exception(exc)).strip()[-2000:],
            )
            without_frames(exc)
        if failed:
            self.eager_calls += 1
            return self.original(sample, *args, **kwargs)
        self.compiled_calls += 1
        self.graphs.add(key)
        log.info(
            "compiled %s for %s in %.1f s (%d graphs)",
            self.name,
            "x".join(str(n) for n in sample.shape),
            time.perf_counter() - start,
            len(self.graphs),
        )
        return out

    def _graph_for(self, sample: torch.Tensor) -> tuple[Any, ...] | None:
        """The compiled graph's key for `sample` (one made or still allowed); None: eager."""
        if sample.ndim != 4 or (int(sample.shape[2]), int(sample.shape[3])) not in self.sizes:
            return None
        module = self.module()
        if module is None or getattr(module, "peft_config", None):
            return None  # LoRA layers are in: see the module docstring
        key = (tuple(sample.shape), sample.dtype, sample.device)
        return key if key in self.graphs or len(self.graphs) < self.max_graphs else None


class Compiler:
    """Compiles each model's UNet and VAE decoder once, for its size buckets."""

    def __init__(
        self,
        *,
        buckets: Sequence[tuple[int, int]] | None = None,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
        warm_up: bool = True,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        """buckets: (width, height) sizes to compile for; None: each model's native size.
        backend / mode: passed to torch.compile ("inductor", or "aot_eager" or a backend
        function in tests)."""
        self.buckets = tuple(buckets) if buckets is not None else None
        self.backend = backend
        self.mode = mode
        self.warm_up = warm_up
        self.max_graphs = max_graphs
        dynamo = torch._dynamo.config
        limit = 8 * max_graphs  # the forward code is shared by every model's UNet
        if hasattr(dynamo, "recompile_limit"):
            dynamo.recompile_limit = max(int(dynamo.recompile_limit), limit)
        else:  # torch < 2.6
            dynamo.cache_size_limit = max(int(dynamo.cache_size_limit), limit)
        try:
            torch._logging.set_logs(recompiles=True)
        except Exception:  # logging is a convenience; never a reason not to run
            log.debug("could not switch on dynamo's recompile log", exc_info=True)

    def sizes(self, pipe: Any) -> list[tuple[int, int]]:
        """(width, height) buckets for `pipe`'s model."""
        if self.buckets is not None:
            return list(self.buckets)
        return [native_size(pipe)]

    def prepare(self, loaded: Any, pipe: Any) -> None:
        """Compile `pipe`'s UNet and VAE decoder (the first time they are seen) and warm up.

        `loaded` is the engine's LoadedModel; all its pipelines share these modules."""
        unet = pipe.unet
        if _parts(pipe):
            return
        name = getattr(getattr(loaded, "entry", None), "name", type(pipe).__name__)
        scale = _vae_scale(pipe)
        latent_sizes = {(h // scale, w // scale) for w, h in self.sizes(pipe)}
        for label, module in (("unet", unet), ("vae decoder", pipe.vae.decoder)):
            module.to(memory_format=torch.channels_last)
            original = module.forward
            compiled = torch.compile(original, backend=self.backend, mode=self.mode, dynamic=False)
            part = _Bucketed(
                f"{name} {label}", module, original, compiled, latent_sizes, self.max_graphs
            )
            # The module holds its dispatcher (and nothing here holds the module), so an
            # evicted model's memory goes with it.
            module.forward = part
        if self.warm_up:
            # The txt2img pipeline: the inpainting one would need an image and a mask.
            entry = getattr(loaded, "entry", None)
            default = getattr(entry, "guidance", None)
            self._warm_up(
                name, getattr(loaded, "base", pipe), 5.0 if default is None else float(default)
            )

    def graphs(self, pipe: Any) -> int:
        """How many graphs `pipe`'s modules have compiled (0 when not prepared)."""
        return sum(len(part.graphs) for part in _parts(pipe))

    def calls(self, pipe: Any) -> tuple[int, int]:
        """(compiled, eager) calls of `pipe`'s compiled modules so far."""
        parts = _parts(pipe)
        return sum(p.compiled_calls for p in parts), sum(p.eager_calls for p in parts)

    def _warm_up(self, name: str, pipe: Any, guidance: float) -> None:
        """`guidance`: the model's default, so the UNet graph warmed is the one members get
        when they do not say (CFG off, batch of one, for a turbo model; CFG on otherwise)."""
        for width, height in self.sizes(pipe):
            start = time.perf_counter()
            try:
                # The engine's own conditions (inference mode, a guided batch of one image)
                # so the graphs made here are the ones its calls use.
                with torch.inference_mode():
                    latents = pipe(
                        prompt="",
                        width=width,
                        height=height,
                        num_inference_steps=2,
                        guidance_scale=guidance,
                        output_type="latent",
                    ).images
                    # The engine's decode itself: an fp16 SDXL VAE (force_upcast) warms
                    # its float32 graph, the one every decode runs.
                    decode_latents(pipe, latents[:1], model=name)
            except Exception:
                log.warning(
                    "compile warm-up of %s at %dx%d failed", name, width, height, exc_info=True
                )
                continue
            log.info(
                "compile warm-up of %s at %dx%d took %.1f s",
                name,
                width,
                height,
                time.perf_counter() - start,
            )


def _parts(pipe: Any) -> list[_Bucketed]:
    """The dispatchers `prepare` set on `pipe`'s modules (none: not prepared)."""
    modules = (pipe.unet, pipe.vae.decoder)
    found = [vars(module).get("forward") for module in modules]
    return [part for part in found if isinstance(part, _Bucketed)]


def _vae_scale(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor", 8))
