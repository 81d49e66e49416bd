"""The pipeline calls of one batch: embeddings and seeds in, latents out, then pixels.

Requests that share a batch_key() run as one pipeline call per prompt length, with one CPU
generator per image, and decode one image at a time; so image i of a batch is the image a
solo run with its seed gives (bit for bit with `exact`, which runs the UNet once per image).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from bot.engine.prompts import Prepared
from bot.engine.results import StepInfo
from bot.jobs import GenerationRequest


def denoise(
    pipe: Any,
    requests: Sequence[GenerationRequest],
    prepared: Sequence[Prepared],
    on_step: Callable[[StepInfo], None] | None,
    *,
    exact: bool,
) -> list[torch.Tensor]:
    """The final latents of each request (count x 4 x h/8 x w/8), in request order."""
    first = requests[0]
    # Requests whose prompts need a different number of 77-token chunks cannot share a
    # call without padding one of them (which would change its image): one call per size.
    groups: dict[int, list[int]] = {}
    for index, p in enumerate(prepared):
        groups.setdefault(p.tokens, []).append(index)
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

        latents = _call(
            pipe, [requests[i] for i in members], prepared, members, step_end, exact=exact
        )
        row = 0
        for index in members:
            n = requests[index].count
            latents_by_request[index] = latents[row : row + n]
            rows[index] = (latents, row)  # finished: previews show its last latents
            row += n
    return [latents_by_request[index] for index in range(len(requests))]


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """RGB images of `latents`, decoded by the model's VAE."""
    # One image at a time: a batch-size-independent result, and the VAE's peak memory
    # (the largest of the whole run at 512px and up) stays that of a single image.
    out: list[Image.Image] = []
    scale = float(pipe.vae.config.scaling_factor)
    for i in range(latents.shape[0]):
        decoded = pipe.vae.decode(latents[i : i + 1] / scale, return_dict=False)[0]
        pil = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        out.append(pil if pil.mode == "RGB" else pil.convert("RGB"))
    return out


#: A safety check shared by every model: the decoded images of one batch in, one verdict per
#: image out (True: NSFW). Called on the GPU thread; it may use the GPU.
SafetyChecker = Callable[[list[Image.Image]], Sequence[bool]]


def safety_flags(
    pipe: Any,
    images: list[Image.Image],
    *,
    device: torch.device,
    dtype: torch.dtype,
    checker: SafetyChecker | None = None,
) -> list[bool]:
    """Per image: flagged by `checker` when one is given, else by the model's own safety
    checker (all False when it has none)."""
    if checker is not None:
        if not images:
            return []
        # A copy of the list: a checker that drops or reorders must not touch our images.
        flags = [bool(flag) for flag in checker(list(images))]
        if len(flags) != len(images):
            # Better no image than an unchecked one: the job fails (GenerationFailed).
            raise ValueError(f"the safety checker gave {len(flags)} verdicts for {len(images)}")
        return flags
    return _pipeline_flags(pipe, images, device=device, dtype=dtype)


def _pipeline_flags(
    pipe: Any, images: list[Image.Image], *, device: torch.device, dtype: torch.dtype
) -> list[bool]:
    checker = getattr(pipe, "safety_checker", None)
    extractor = getattr(pipe, "feature_extractor", None)
    if checker is None or extractor is None or not images:
        return [False] * len(images)
    features = extractor(images, return_tensors="pt").pixel_values
    features = features.to(device=device, dtype=dtype)
    # The checker blacks out flagged images in place; give it a copy and keep ours, so
    # what to do with a flagged image stays the front end's (and the server's) choice.
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    _, flags = checker(images=arrays, clip_input=features)
    return [bool(flag) for flag in flags]


def _call(
    pipe: Any,
    requests: list[GenerationRequest],
    prepared: Sequence[Prepared],
    members: list[int],
    step_end: Callable[..., dict[str, Any]],
    *,
    exact: bool,
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
    if "mask_image" in set(inspect.signature(pipe.__call__).parameters):
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
    with _per_image_unet(pipe.unet, len(generators), enabled=exact):
        result = pipe(**kwargs)
    latents: torch.Tensor = result.images
    return latents


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
        # Lazy: diffusers takes seconds to import; this runs only inside a pipeline call.
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward
