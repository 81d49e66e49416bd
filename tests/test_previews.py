"""Previews: the predicted final image (x0) of each step, through TAESD when its weights are
in the cache folder, else the linear map of the model's family; and at most one preview per
`preview_interval_s` per job in the executor.

The engine parts run the real tiny pipeline and real diffusers schedulers; the executor part
runs the real GPU thread on the scripted engine of tests/test_fair_queue.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bot.backend import Progress, StepInfoLike
from bot.db import Database
from bot.engine import Engine, StepInfo, latents_preview
from bot.engine.denoise import denoise
from bot.engine.previews import TAESD_DIRS, Previews, linear_decoder
from bot.engine.prompts import encode_prompt
from bot.engine.results import SDXL_LATENT_RGB
from bot.engine.sources import pipeline_family
from bot.executor import GpuExecutor
from bot.jobs import GenerationRequest
from bot.samplers import make_scheduler
from bot.tiny_xl import sdxl_unet
from tests.test_fair_queue import FakeEngine, FakeStep, events_of, origin, req


def tiny_request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a fox",
        "model": "builtin:tiny",
        "width": 72,
        "height": 64,
        "steps": 4,
        "seed": 5,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def run_denoise(
    engine: Engine, sampler: str, previews: Previews | None = None
) -> tuple[list[Image.Image], list[torch.Tensor], list[torch.Tensor]]:
    """Denoise one 2-image request with `sampler`, previewing request 0 at every step.

    Returns (previews, what each scheduler step returned as x0 or None, each step's latents),
    the last two recorded by a wrapper around the scheduler's step (outside the engine's own).
    """
    request = tiny_request(count=2, scheduler=sampler)
    pipe = engine.pipeline(request.model, "txt2img")
    loaded = engine.models.ensure(request.model)
    pipe.scheduler = make_scheduler(sampler, loaded.scheduler_config)
    scheduler = pipe.scheduler
    original = scheduler.step
    x0s: list[Any] = []
    latents: list[torch.Tensor] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        x0s.append(out[1] if isinstance(out, tuple) and len(out) > 1 else None)
        latents.append(out[0])
        return out

    scheduler.step = step
    shown: list[Image.Image] = []

    def on_step(info: StepInfo) -> None:
        shown.append(info.preview(0))

    with torch.inference_mode():
        prepared = [encode_prompt(pipe, request, cfg=True, device=engine.device)]
        denoise(pipe, [request], prepared, on_step, exact=False, previews=previews)
    del scheduler.step
    return shown, x0s, latents


def test_previews_show_the_predicted_final_image(engine: Engine) -> None:
    shown, x0s, latents = run_denoise(engine, "Euler")
    assert len(shown) == 4 and all(x0 is not None for x0 in x0s)
    for image, x0 in zip(shown, x0s, strict=True):
        assert image.size == (9, 8)  # the linear map: 1/8 of 72x64
        assert image.tobytes() == latents_preview(x0[0]).tobytes()
    # Before the last step the noisy latents are something else.
    for image, noisy in zip(shown[:-1], latents[:-1], strict=True):
        assert image.tobytes() != latents_preview(noisy[0]).tobytes()
    # Euler's last step lands on its prediction: the last preview is the final latents'.
    assert shown[-1].tobytes() == latents_preview(latents[-1][0]).tobytes()


def test_multistep_solvers_preview_their_data_prediction(engine: Engine) -> None:
    # DPM++ returns only the next sample; its kept model output is the x0 prediction.
    shown, _, latents = run_denoise(engine, "DPM++ 2M")
    assert len(shown) == 4
    assert shown[0].tobytes() != latents_preview(latents[0][0]).tobytes()
    assert shown[-1].tobytes() == latents_preview(latents[-1][0]).tobytes()


def test_a_scheduler_without_a_prediction_previews_the_latents(engine: Engine) -> None:
    shown, x0s, latents = run_denoise(engine, "PLMS")
    assert x0s and all(x0 is None for x0 in x0s)
    for image, noisy in zip(shown, latents[-len(shown) :], strict=True):
        assert image.tobytes() == latents_preview(noisy[0]).tobytes()


def write_taesd(folder: Path) -> Path:
    """A random-weight TAESD (diffusers AutoencoderTiny) with small blocks."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny: Any = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    tiny.save_pretrained(str(folder))
    return folder


def test_taesd_previews_are_full_size_when_its_weights_are_in_the_cache(
    engine: Engine, tmp_path: Path
) -> None:
    write_taesd(tmp_path / TAESD_DIRS["sd"])
    previews = Previews(tmp_path, device=engine.device, dtype=engine.dtype)
    shown, _, _ = run_denoise(engine, "Euler", previews)
    assert [image.size for image in shown] == [(72, 64)] * 4
    assert len({image.tobytes() for image in shown}) == 4  # each step its own prediction
    # No TAESD for this family in the folder: the linear map.
    without = Previews(tmp_path / "empty", device=engine.device, dtype=engine.dtype)
    assert run_denoise(engine, "Euler", without)[0][0].size == (9, 8)


def test_sdxl_models_preview_with_the_sdxl_factors() -> None:
    unet = sdxl_unet(
        sample_size=8, blocks=(32, 64), layers=1, heads=8, text_widths=(16, 16), time_dim=8
    )

    class Pipe:
        def __init__(self, unet: Any) -> None:
            self.unet = unet

    assert pipeline_family(Pipe(unet)) == "sdxl"
    latents = torch.randn(4, 6, 5)
    got = np.asarray(linear_decoder("sdxl")(latents), dtype=np.int16)
    factors, bias = SDXL_LATENT_RGB
    rgb = torch.einsum("chw,cr->hwr", latents, torch.tensor(factors)) + torch.tensor(bias)
    want = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy().astype(np.int16)
    assert got.shape == (6, 5, 3) and np.abs(got - want).max() <= 1
    assert not np.array_equal(got, np.asarray(latents_preview(latents), dtype=np.int16))


class TimedPreviews(FakeEngine):
    """The scripted engine, noting when each preview is computed (the cost being saved)."""

    def __init__(self, step_delay: float) -> None:
        super().__init__(step_delay=step_delay)
        self.preview_times: list[float] = []

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> list[Any]:
        def timed(info: StepInfoLike) -> None:
            assert on_step is not None

            def preview(index: int) -> Image.Image:
                self.preview_times.append(time.monotonic())
                return Image.new("RGB", (8, 8))

            on_step(FakeStep(info.step, info.total, preview))

        return super().generate(requests, on_step=timed if on_step is not None else None)


@pytest.mark.parametrize("interval", [0.4, 0.0])
async def test_a_job_gets_at_most_one_preview_per_interval(tmp_path: Path, interval: float) -> None:
    engine = TimedPreviews(step_delay=0.02)
    db = await Database.open(tmp_path / "x.db")
    ex = GpuExecutor(
        engine, db, preview_every=1, progress_interval_s=0.0, preview_interval_s=interval
    )
    await ex.start()
    try:
        job = await ex.submit(origin(1), req(steps=60))
        events = await events_of(job)
    finally:
        await ex.close()
        await db.close()
    times = engine.preview_times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    previews = [e for e in events if isinstance(e, Progress) and e.preview is not None]
    assert previews and len(times) >= 2
    if interval:
        # 60 steps of at least 20 ms: 1.2 s or more, so 2 to 4 previews, 0.4 s apart or more.
        assert all(gap >= interval for gap in gaps)
    else:
        assert len(times) == 59  # every step but the last, as `preview_every` steps alone say
