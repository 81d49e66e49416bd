"""The pipeline calls of one batch: embeddings and seeds in, latents out; and the safety
check of the decoded images (the decode itself is `bot.engine.decode`).

Requests that share a batch_key() run as one pipeline call per prompt length, with one CPU
generator per image, and decode one image at a time; so image i of a batch is the image a
solo run with its seed gives (bit for bit with `exact`, which runs the UNet once per image).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from bot.engine.exact import per_image_unet
from bot.engine.previews import X0, Previews, capture_x0, linear_decoder
from bot.engine.prompts import Prepared
from bot.engine.results import StepInfo
from bot.engine.sources import pipeline_family
from bot.jobs import GenerationRequest


def denoise(
    pipe: Any,
    requests: Sequence[GenerationRequest],
    prepared: Sequence[Prepared],
    on_step: Callable[[StepInfo], None] | None,
    *,
    exact: bool,
    previews: Previews | None = None,
) -> list[torch.Tensor]:
    """The final latents of each request (count x 4 x h/8 x w/8), in request order.

    `on_step` gets a StepInfo after every step; its previews show each step's prediction of
    the final image, through `previews`' decoder for this model (else the linear map).
    """
    first = requests[0]
    # Requests whose prompts need a different number of 77-token chunks cannot share a
    # call without padding one of them (which would change its image): one call per size.
    groups: dict[int, list[int]] = {}
    for index, p in enumerate(prepared):
        groups.setdefault(p.tokens, []).append(index)
    latent_size = (first.width // 8, first.height // 8)
    rows: list[tuple[Any, int] | None] = [None] * len(requests)
    latents_by_request: dict[int, torch.Tensor] = {}
    decode = None
    if on_step is not None:
        decode = (
            previews.decoder(pipe)
            if previews is not None
            else linear_decoder(pipeline_family(pipe))
        )
    for number, members in enumerate(groups.values()):
        x0 = X0()

        def step_end(
            pipeline: Any,
            step_index: int,
            timestep: Any,
            kwargs: dict[str, Any],
            members: list[int] = members,
            number: int = number,
            x0: X0 = x0,
        ) -> dict[str, Any]:
            # No host sync here: references and Python ints only; a preview is computed (and
            # copied off the device) only when the executor asks for one.
            if on_step is not None:
                per_call = int(pipeline.num_timesteps)
                latents = kwargs["latents"]
                if step_index + 1 < per_call:
                    # The step's prediction of the final latents, not the noisy ones (the
                    # last step's latents are final: for inpainting, blended with the input's).
                    latents = x0.of(latents)
                row = 0
                for index in members:
                    rows[index] = (latents, row)
                    row += requests[index].count
                on_step(
                    StepInfo(
                        step=number * per_call + step_index + 1,
                        total=per_call * len(groups),
                        _rows=tuple(rows),
                        _latent_size=latent_size,
                        _decode=decode,
                    )
                )
            return kwargs

        with capture_x0(pipe, x0):
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
    shared: tuple[Any, Any] = (None, None),
) -> list[bool]:
    """Per image: flagged by `checker` when one is given, else by the model's own safety
    checker, else by `shared` (the engine's shared checker module and its feature extractor:
    SDXL pipelines have no checker of their own); all False when there is none."""
    if checker is not None:
        if not images:
            return []
        # A copy of the list: a checker that drops or reorders must not touch our images.
        flags = [bool(flag) for flag in checker(list(images))]
        if len(flags) != len(images):
            # Better no image than an unchecked one: the job fails (GenerationFailed).
            raise ValueError(f"the safety checker gave {len(flags)} verdicts for {len(images)}")
        return flags
    own = getattr(pipe, "safety_checker", None), getattr(pipe, "feature_extractor", None)
    module, extractor = own if None not in own else shared
    return _module_flags(module, extractor, images, device=device, dtype=dtype)


def _module_flags(
    checker: Any,
    extractor: Any,
    images: list[Image.Image],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> list[bool]:
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
    embeds: dict[str, list[torch.Tensor]] = {}
    generators: list[torch.Generator] = []
    for request, index in zip(requests, members, strict=True):
        p = prepared[index]
        for seed in request.seeds:
            # SDXL's pooled embeddings ride along; the pipeline makes its time ids from sizes.
            for name, tensor in (
                ("prompt_embeds", p.positive),
                ("negative_prompt_embeds", p.negative),
                ("pooled_prompt_embeds", p.pooled),
                ("negative_pooled_prompt_embeds", p.negative_pooled),
            ):
                if tensor is not None:
                    embeds.setdefault(name, []).append(tensor)
            # A CPU generator per image: the same seed gives the same image on any device
            # and at any position in any batch.
            generators.append(torch.Generator(device="cpu").manual_seed(seed))
    parameters = set(inspect.signature(pipe.__call__).parameters)
    kwargs: dict[str, Any] = {
        **{name: torch.cat(tensors) for name, tensors in embeds.items()},
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance,
        "generator": generators,
        "output_type": "latent",
        "callback_on_step_end": step_end,
    }
    if "width" in parameters:  # img2img pipelines take the size of their image
        kwargs.update(width=first.width, height=first.height)
    size = (first.width, first.height)
    if "mask_image" in parameters:
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
    with per_image_unet(pipe.unet, len(generators), enabled=exact):
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
