"""The engine's three modes, samplers, batching and determinism on the tiny model (no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bot.catalog import BUILTIN_TINY_INPAINT, Catalog
from bot.engine import Engine, GenerationResult, StepInfo
from bot.errors import GenerationFailed, JobCancelled
from bot.imaging import make_grid
from bot.jobs import GenerationRequest
from bot.samplers import SCHEDULER_NAMES
from bot.tiny_model import TINY_MODEL_DIRNAME, ensure_tiny_model

LONG_PROMPT = ", ".join(["a small red fox in deep snow under pine trees"] * 9)  # > 75 tokens


@pytest.fixture(scope="module")
def engine(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    catalog = Catalog.load(None, tmp_path_factory.mktemp("loras"))
    return Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)


def init_image(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: a picture-like input the VAE can encode.
    x = np.linspace(0, 255, size[0])[None, :, None]
    y = np.linspace(0, 255, size[1])[:, None, None]
    base = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")


def left_mask(size: tuple[int, int] = (64, 64), width: int = 32) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, width, size[1]))
    return mask


def make(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a red fox in snow",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance": 7.0,
        "seed": 1234,
    }
    fields.update(overrides)
    if fields.get("mode") in ("img2img", "inpaint"):
        size = (fields["width"], fields["height"])
        fields.setdefault("init_image", init_image(size))
        if fields["mode"] == "inpaint":
            fields.setdefault("mask_image", left_mask(size))
    return GenerationRequest(**fields)


def one(engine: Engine, request: GenerationRequest, **kwargs: Any) -> GenerationResult:
    results = engine.generate([request], **kwargs)
    assert len(results) == 1
    return results[0]


def raw(image: Image.Image) -> bytes:
    return image.tobytes()


def is_real_image(image: Image.Image) -> bool:
    return image.mode == "RGB" and float(np.asarray(image).std()) > 1.0


# -- modes ------------------------------------------------------------------------------------


def test_txt2img_count_gives_one_image_per_seed_and_a_grid(engine: Engine) -> None:
    result = one(engine, make(count=2, seed=10))
    assert result.seeds == [10, 11]
    assert result.nsfw == [False, False]
    assert result.sampler == "Euler"  # the tiny model's own scheduler
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert all(is_real_image(im) for im in result.images)
    assert raw(result.images[0]) != raw(result.images[1])
    grid = make_grid(result.images)
    assert grid.size == (128, 64)
    assert raw(grid.crop((64, 0, 128, 64))) == raw(result.images[1])


def test_img2img_follows_input_and_strength(engine: Engine) -> None:
    low = one(engine, make(mode="img2img", strength=0.3)).images[0]
    high = one(engine, make(mode="img2img", strength=0.9)).images[0]
    other_input = one(engine, make(mode="img2img", strength=0.3, init_image=init_image(seed=5)))
    plain = one(engine, make()).images[0]
    assert low.size == (64, 64) and is_real_image(low)
    assert len({raw(low), raw(high), raw(other_input.images[0]), raw(plain)}) == 4


def test_img2img_keeps_aspect_of_a_non_square_request(engine: Engine) -> None:
    request = make(mode="img2img", width=96, height=64, init_image=init_image((96, 64)))
    assert one(engine, request).images[0].size == (96, 64)


def test_inpaint_keeps_unmasked_latents_and_repaints_the_mask(engine: Engine) -> None:
    """The 4-channel path: outside the mask the final latents are the input image's latents
    (whatever the prompt); inside they are generated (they follow the prompt)."""
    finals: list[Image.Image] = []

    def last_preview(info: StepInfo) -> None:
        if info.step == info.total:
            finals.append(info.preview(0))

    for prompt in ("a red fox", "a blue whale"):
        result = one(engine, make(mode="inpaint", prompt=prompt), on_step=last_preview)
        assert result.images[0].size == (64, 64) and is_real_image(result.images[0])
    first, second = (np.asarray(p, dtype=int) for p in finals)
    assert first.shape == (8, 8, 3)  # latent-sized preview
    assert (first[:, 4:] == second[:, 4:]).all()  # right half: kept
    assert (first[:, :4] != second[:, :4]).any()  # left half: repainted per prompt
    # The mask decides what is repainted.
    other_mask = one(engine, make(mode="inpaint", seed=1, mask_image=left_mask(width=16)))
    assert raw(other_mask.images[0]) != raw(one(engine, make(mode="inpaint", seed=1)).images[0])


def test_inpainting_unet_is_used_natively_for_every_mode(engine: Engine) -> None:
    pipe = engine.pipeline(BUILTIN_TINY_INPAINT, "inpaint")
    assert pipe.unet.config.in_channels == 9
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    # txt2img and img2img on an inpainting model run its inpainting pipeline too.
    assert engine.pipeline(BUILTIN_TINY_INPAINT, "txt2img") is pipe
    for mode in ("txt2img", "img2img", "inpaint"):
        request = make(model=BUILTIN_TINY_INPAINT, mode=mode)
        first = one(engine, request).images[0]
        assert is_real_image(first), mode
        assert raw(first) == raw(one(engine, request).images[0]), mode


def test_modes_share_one_copy_of_the_weights(engine: Engine) -> None:
    base = engine.load("tiny")
    img2img = engine.pipeline("tiny", "img2img")
    inpaint = engine.pipeline("tiny", "inpaint")
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(img2img, name) is getattr(base, name), name
        assert getattr(inpaint, name) is getattr(base, name), name
    assert engine.pipeline("tiny", "txt2img") is base
    # Same tensors, not copies with equal values.
    weight = base.unet.conv_in.weight
    assert inpaint.unet.conv_in.weight.data_ptr() == weight.data_ptr()
    assert weight.dtype == engine.dtype


# -- samplers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_sampler_runs_on_the_tiny_model(engine: Engine, name: str) -> None:
    steps: list[tuple[int, int]] = []
    request = make(scheduler=name, steps=3)
    result = one(engine, request, on_step=lambda info: steps.append((info.step, info.total)))
    assert result.sampler == name
    assert is_real_image(result.images[0])
    total = steps[-1][1]
    assert steps == [(i, total) for i in range(1, total + 1)]
    assert total >= 3
    assert raw(result.images[0]) == raw(one(engine, request).images[0])


def test_samplers_give_different_images(engine: Engine) -> None:
    images = {raw(one(engine, make(scheduler=name)).images[0]) for name in ("Euler", "DDIM")}
    assert len(images) == 2


@pytest.mark.parametrize(("mode", "name"), [("img2img", "DPM2 a Karras"), ("inpaint", "PLMS")])
def test_samplers_with_strength(engine: Engine, mode: str, name: str) -> None:
    result = one(engine, make(mode=mode, scheduler=name, strength=0.5, steps=4))
    assert result.sampler == name and is_real_image(result.images[0])


# -- batching and determinism ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "scheduler"), [("txt2img", "Euler a"), ("img2img", "DPM++ 2M"), ("inpaint", "UniPC")]
)
def test_batched_image_equals_solo_run_pixel_for_pixel(
    engine: Engine, mode: str, scheduler: str
) -> None:
    """Requests with different prompts, negatives, inputs and seeds in one call: each image is
    bit-identical to a solo run with its seed (the executor's micro-batching relies on it)."""
    common = {"mode": mode, "scheduler": scheduler, "strength": 0.7}
    batch = [
        make(seed=10, count=2, **common),
        make(prompt="a blue cat", negative_prompt="blurry", seed=99, init_image=init_image(seed=3),
             **common),
        make(prompt="the dog", seed=10, guidance=7.0, **common),
    ]  # fmt: skip
    results = engine.generate(batch)
    assert [r.seeds for r in results] == [[10, 11], [99], [10]]
    solos = [
        make(seed=10, **common),
        make(seed=11, **common),
        batch[1],
        batch[2],
    ]
    batched = [im for r in results for im in r.images]
    for image, solo in zip(batched, solos, strict=True):
        assert raw(image) == raw(one(engine, solo).images[0])
    # Same prompt, different seed: different images; same seed, different prompt: different.
    assert raw(batched[0]) != raw(batched[1])
    assert raw(batched[0]) != raw(batched[3])


def test_same_request_same_pixels(engine: Engine) -> None:
    request = make(count=2, scheduler="DPM++ 2M SDE Karras")
    first, second = one(engine, request), one(engine, request)
    assert [raw(i) for i in first.images] == [raw(i) for i in second.images]


def test_requests_with_different_settings_cannot_share_a_batch(engine: Engine) -> None:
    from bot.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="cannot share a batch"):
        engine.generate([make(steps=4), make(steps=5)])
    assert engine.generate([]) == []


# -- prompts ---------------------------------------------------------------------------------


def test_long_prompt_is_not_cut_at_77_tokens(engine: Engine) -> None:
    pipe = engine.load("tiny")
    tokens = len(pipe.tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids)
    assert tokens > 75
    base = one(engine, make(prompt=LONG_PROMPT)).images[0]
    # Words after the first 75 tokens change the image: they are encoded, not dropped.
    changed = one(engine, make(prompt=LONG_PROMPT + ", green sky")).images[0]
    assert raw(base) != raw(changed)
    assert raw(base) == raw(one(engine, make(prompt=LONG_PROMPT)).images[0])


def test_long_and_short_prompts_in_one_batch_still_match_solo_runs(engine: Engine) -> None:
    steps: list[tuple[int, int]] = []
    previews: list[tuple[int, int]] = []

    def on_step(info: StepInfo) -> None:
        steps.append((info.step, info.total))
        previews.append(info.preview(1).size)

    batch = [make(seed=5), make(prompt=LONG_PROMPT, seed=6, negative_prompt="ugly")]
    results = engine.generate(batch, on_step=on_step)
    for request, result in zip(batch, results, strict=True):
        assert raw(result.images[0]) == raw(one(engine, request).images[0])
    # Two prompt lengths -> two pipeline calls, reported as one run of 2 x 4 steps.
    assert steps == [(i, 8) for i in range(1, 9)]
    assert set(previews) == {(8, 8)}


# -- progress, cancellation, failures, safety ------------------------------------------------


def test_previews_are_small_rgb_and_per_request(engine: Engine) -> None:
    seen: list[tuple[Image.Image, Image.Image]] = []

    def on_step(info: StepInfo) -> None:
        seen.append((info.preview(0), info.preview(1)))

    engine.generate([make(seed=1, width=128), make(seed=2, width=128)], on_step=on_step)
    assert len(seen) == 4
    first, second = seen[-1]
    assert first.mode == "RGB" and first.size == (16, 8)
    assert raw(first) != raw(second)


def test_cancel_from_on_step_propagates_and_engine_stays_usable(engine: Engine) -> None:
    request = make(mode="img2img", count=2, scheduler="Euler a")
    before = one(engine, request)

    def cancel(info: StepInfo) -> None:
        if info.step == 2:
            raise JobCancelled("Cancelled by its owner.")

    with pytest.raises(JobCancelled):
        engine.generate([request], on_step=cancel)
    after = one(engine, request)
    assert [raw(i) for i in before.images] == [raw(i) for i in after.images]


def test_a_pipeline_error_is_a_user_safe_generation_failed(
    engine: Engine, model_cache: Path, tmp_path: Path
) -> None:
    """A model whose text encoder does not fit its UNet loads, then fails inside the
    pipeline: the user gets a GenerationFailed, and the engine keeps serving."""
    from transformers import CLIPTextConfig, CLIPTextModel

    broken = tmp_path / "mismatched"
    shutil.copytree(model_cache / TINY_MODEL_DIRNAME, broken)
    config = json.loads((broken / "text_encoder" / "config.json").read_text())
    config.update(hidden_size=16, intermediate_size=32, projection_dim=16)
    for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        config.pop(key, None)
    shutil.rmtree(broken / "text_encoder")
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(str(broken / "text_encoder"))

    with pytest.raises(GenerationFailed) as info:
        one(engine, make(model=str(broken)))
    assert info.value.message == (
        "Image generation failed unexpectedly. Try again, or with different settings."
    )
    assert is_real_image(one(engine, make()).images[0])


@pytest.fixture(scope="module")
def checked_model(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model plus a tiny (random) StableDiffusionSafetyChecker and its processor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("checked")
    pipe: Any = StableDiffusionPipeline.from_pretrained(
        str(ensure_tiny_model(model_cache)), local_files_only=True
    )
    torch.manual_seed(0)
    clip = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=768,
    )  # fmt: skip
    checker = StableDiffusionSafetyChecker(clip).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    out: Any = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, safety_checker=checker, feature_extractor=processor,
    )  # fmt: skip
    out.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("flag_all", [True, False])
def test_safety_checker_verdict_comes_with_the_unaltered_image(
    model_cache: Path, checked_model: Path, tmp_path: Path, flag_all: bool
) -> None:
    engine = Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, catalog=Catalog.load(None, tmp_path)
    )
    pipe = engine.load(str(checked_model))
    # A concept threshold of -10 flags every image; +10 flags none.
    with torch.no_grad():
        pipe.safety_checker.concept_embeds_weights.fill_(-10.0 if flag_all else 10.0)
        pipe.safety_checker.special_care_embeds_weights.fill_(10.0)
    result = one(engine, make(model=str(checked_model), count=2))
    assert result.nsfw == [flag_all, flag_all]
    plain = one(engine, make(model=str(checked_model), count=2))
    assert all(is_real_image(im) for im in result.images)  # not blacked out
    assert [raw(i) for i in plain.images] == [raw(i) for i in result.images]


def test_without_guidance_batches_still_match_solo_runs(engine: Engine) -> None:
    # guidance <= 1 skips the unconditional half: one UNet row per image instead of two.
    batch = [make(seed=3, guidance=1.0, count=2), make(prompt="a cat", seed=8, guidance=1.0)]
    images = [im for r in engine.generate(batch) for im in r.images]
    solos = [make(seed=3, guidance=1.0), make(seed=4, guidance=1.0), batch[1]]
    assert [raw(i) for i in images] == [raw(one(engine, s).images[0]) for s in solos]


def test_sampler_labels_for_the_png() -> None:
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    from bot.samplers import make_scheduler, scheduler_label

    sd15 = dict(PNDMScheduler(skip_prk_steps=True, steps_offset=1).config)
    assert scheduler_label(make_scheduler("default", sd15)) == "PLMS"
    karras = make_scheduler("DPM++ 2M Karras", sd15)
    assert type(karras) is DPMSolverMultistepScheduler and karras.config.use_karras_sigmas
    assert scheduler_label(karras) == "DPM++ 2M Karras"
    # A model whose own scheduler uses Karras sigmas does not lend them to plain "DPM++ 2M".
    assert scheduler_label(make_scheduler("DPM++ 2M", dict(karras.config))) == "DPM++ 2M"
    assert scheduler_label(make_scheduler("dpm++ 2m sde", sd15)) == "DPM++ 2M SDE"
