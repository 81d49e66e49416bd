"""Exact batches: a batched pipeline call whose UNet runs once per image.

Kernels pick other summation orders for other batch sizes, so a batched image differs from a
solo run with its seed by rounding. `per_image_unet` makes each UNet call of a batch the solo
call, image by image, so image i of a batch is bit-identical to the solo image. It costs the
batching speed-up (measured by `sdbot bench gpu`, row "exact batches"), which is why the engine
turns it on only off CUDA by default.

No host syncs: the row indexes are built once per pipeline call (on the first UNet call, when
the device is known), never per step, so the denoising loop queues GPU work without waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from bot.engine.patching import patched


class _Indexes:
    """Image i's rows of a batch of `total` rows, one index tensor per image, made once."""

    def __init__(self, images: int) -> None:
        self.images = images
        self._cache: dict[tuple[int, torch.device], list[torch.Tensor]] = {}

    def rows(self, total: int, device: torch.device) -> list[torch.Tensor]:
        key = (total, device)
        found = self._cache.get(key)
        if found is None:
            copies = total // self.images
            # One host-to-device copy for the whole call (not one per image and step).
            table = torch.arange(total).view(copies, self.images).t().contiguous().to(device)
            found = list(table.unbind(0))
            self._cache[key] = found
        return found


@contextlib.contextmanager
def per_image_unet(unet: Any, images: int, *, enabled: bool) -> Iterator[None]:
    """While active, a UNet call on a batch runs once per image.

    The pipeline stacks [uncond_0..uncond_n-1, cond_0..cond_n-1]; image i's rows are
    (i, n + i), exactly the two rows a solo run feeds the UNet, so each per-image call is
    the solo call and its output is bit-identical to it.
    """
    if not enabled or images <= 1:
        yield
        return
    # The instance's own forward (torch.compile's dispatcher, bot/engine/compile.py) when it
    # has one; `patched` puts it back afterwards.
    original = unet.forward
    indexes = _Indexes(images)

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        total = sample.shape[0]
        if total % images:
            return original(sample, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)

        rows = indexes.rows(total, sample.device)

        def pick(value: Any, i: int) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == total:
                # Indexing (unlike index_select) keeps the memory format: img2img latents are
                # channels-last, and convolutions take another (not bit-equal) kernel on a
                # contiguous copy. The index lives on the tensor's device: no sync.
                same = value.device == sample.device
                return value[rows[i] if same else indexes.rows(total, value.device)[i]]
            if isinstance(value, dict):  # SDXL's added_cond_kwargs: text_embeds, time_ids
                return {key: pick(item, i) for key, item in value.items()}
            return value

        out: torch.Tensor | None = None
        for i, index in enumerate(rows):
            result = original(
                pick(sample, i),
                *(pick(a, i) for a in args),
                return_dict=False,
                **{k: pick(v, i) for k, v in kwargs.items()},
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

    with patched(unet, "forward", forward):
        yield
