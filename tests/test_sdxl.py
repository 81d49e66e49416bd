"""The SDXL family on the tiny random-weight SDXL model (`builtin:tiny-xl`), no mocks: its three
modes, two text encoders with pooled embeddings, long prompts, CFG off, LoRAs, embeddings, and
how a model's family and weights variant are found."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bot.catalog import Catalog, parse_catalog
from bot.engine import Engine
from bot.engine.prompts import _encode_sdxl_chunks, _rows, encode_prompt
from bot.jobs import GenerationRequest, LoraSpec
from bot.tiny_xl import TINY_XL_DIRNAME, ensure_tiny_xl
from tests.test_engine_modes import LONG_PROMPT, init_image, is_real_image, raw
from tests.test_engine_modes import make as make_request

EMBEDDING = "sdbot-style"


def write_tiny_xl_lora(model_dir: Path, path: Path, *, seed: int) -> Path:
    """A LoRA for tiny-xl: random weights on the UNet's attention and both text encoders, saved
    as diffusers' SDXL training script saves them."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe: Any = StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(seed)
    unet = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # fmt: skip
    text = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])  # fmt: skip
    pipe.unet.add_adapter(unet)
    pipe.text_encoder.add_adapter(text)
    pipe.text_encoder_2.add_adapter(text)
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent),
        weight_name=path.name,
        safe_serialization=True,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
    )
    return path


@pytest.fixture(scope="module")
def lora_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_tiny_xl_lora(ensure_tiny_xl(model_cache), folder / "xl-ink.safetensors", seed=1)
    (folder / "embeddings").mkdir()
    torch.manual_seed(3)
    # An SDXL embedding: vectors for each text encoder, as A1111 and diffusers store them.
    xl = {"clip_l": torch.randn(2, 32) * 5, "clip_g": torch.randn(2, 32) * 5}
    save_file(xl, str(folder / "embeddings" / f"{EMBEDDING}.safetensors"))
    # An SD 1.x embedding (one vector set): it does not fit SDXL.
    torch.save({"sd-only": torch.randn(1, 32)}, str(folder / "embeddings" / "sd-only.pt"))
    return folder


@pytest.fixture(scope="module")
def engine(model_cache: Path, lora_dir: Path) -> Engine:
    catalog = Catalog.load(None, lora_dir)
    return Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)


def make(**overrides: Any) -> GenerationRequest:
    """test_engine_modes' request (pictures included) on tiny-xl, 3 steps, guidance 6."""
    fields: dict[str, Any] = {"model": "tiny-xl", "steps": 3, "guidance": 6.0, **overrides}
    if fields.get("mode") in ("img2img", "inpaint"):
        fields.setdefault("strength", 0.7)
    return make_request(**fields)


def pixels(engine: Engine, request: GenerationRequest) -> bytes:
    [result] = engine.generate([request])
    assert is_real_image(result.images[0])
    return raw(result.images[0])


# -- loading -------------------------------------------------------------------------------------


def test_tiny_xl_loads_as_sdxl_and_its_modes_share_weights(engine: Engine) -> None:
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    base = engine.load("tiny-xl")
    assert base.unet.config.addition_embed_type == "text_time"
    assert engine.models.get("tiny-xl").family == "sdxl"
    img2img = engine.pipeline("tiny-xl", "img2img")
    inpaint = engine.pipeline("tiny-xl", "inpaint")
    for pipe in (img2img, inpaint):
        assert pipe.text_encoder_2 is base.text_encoder_2 and pipe.unet is base.unet
    assert (type(base), type(img2img), type(inpaint)) == (
        StableDiffusionXLPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )
    assert engine.native_size("tiny-xl") == (64, 64)


def test_a_folder_not_in_the_catalog_is_loaded_as_sdxl_by_its_model_index(
    model_cache: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(ensure_tiny_xl(model_cache), tmp_path / "my-xl")
    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache)
    assert engine.catalog.resolve(str(folder)).family is None  # not said: found when loading
    assert engine.models.ensure(str(folder)).family == "sdxl"
    [result] = engine.generate([make(model=str(folder), steps=2)])
    assert is_real_image(result.images[0])


def test_a_weights_variant_is_loaded_and_its_absence_falls_back(
    model_cache: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    # A folder holding only fp16 files: it loads only when the variant is asked for.
    pipe: Any = StableDiffusionXLPipeline.from_pretrained(
        str(ensure_tiny_xl(model_cache)), local_files_only=True
    )
    pipe.to(torch.float16).save_pretrained(str(tmp_path / "xl-fp16"), variant="fp16")
    assert not list((tmp_path / "xl-fp16").rglob("diffusion_pytorch_model.safetensors"))
    catalog_text = f"""
[models.half]
source = "{tmp_path / "xl-fp16"}"
variant = "fp16"
[models.plain]
source = "builtin:tiny-xl"
variant = "fp16"
"""
    catalog = Catalog(parse_catalog(catalog_text, where="test"), tmp_path, tmp_path)
    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)
    for name in ("half", "plain"):  # plain has no fp16 files: its default weights load
        loaded = engine.models.ensure(name)
        assert loaded.family == "sdxl" and loaded.base.unet.dtype == torch.float32
        assert is_real_image(engine.generate([make(model=name, steps=2)])[0].images[0])


# -- the three modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_every_mode_runs_and_a_seed_reproduces_its_image(engine: Engine, mode: str) -> None:
    steps: list[int] = []
    [result] = engine.generate([make(mode=mode)], on_step=lambda info: steps.append(info.step))
    assert result.images[0].size == (64, 64) and is_real_image(result.images[0])
    assert steps and steps == list(range(1, len(steps) + 1))
    assert raw(result.images[0]) == pixels(engine, make(mode=mode))
    assert raw(result.images[0]) != pixels(engine, make(mode=mode, seed=99))


def test_inpaint_keeps_the_unmasked_half_closer_than_the_masked_half(engine: Engine) -> None:
    source = np.asarray(init_image((64, 64)), dtype=np.float32)
    [result] = engine.generate([make(mode="inpaint", strength=1.0)])
    out = np.asarray(result.images[0], dtype=np.float32)
    masked, kept = np.abs(out - source)[:, :32].mean(), np.abs(out - source)[:, 32:].mean()
    assert kept < masked


def test_guidance_zero_switches_cfg_off_so_the_negative_prompt_has_no_effect(
    engine: Engine,
) -> None:
    assert pixels(engine, make(guidance=0.0)) == pixels(
        engine, make(guidance=0.0, negative_prompt="blurry")
    )
    assert pixels(engine, make(guidance=6.0)) != pixels(
        engine, make(guidance=6.0, negative_prompt="blurry")
    )


def test_a_batch_of_several_requests_matches_their_solo_runs(model_cache: Path) -> None:
    # Batched (not exact) UNet calls: equal to the solo run up to rounding.
    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache, exact_batches=False)
    batch = [make(seed=1), make(seed=2, prompt="a cat"), make(seed=3, negative_prompt="dark")]
    results = engine.generate(batch)
    for request, result in zip(batch, results, strict=True):
        [solo] = engine.generate([request])
        diff = np.abs(np.asarray(solo.images[0], np.int16) - np.asarray(result.images[0], np.int16))
        assert diff.max() <= 2


def test_an_exact_batch_of_sdxl_images_equals_their_solo_runs(engine: Engine) -> None:
    # Exact batches (the CPU default) run the UNet once per image: SDXL's added_cond_kwargs
    # (pooled text embeddings, time ids) must be split per image like the sample.
    assert engine.exact_batches
    [batched] = engine.generate([make(seed=5, count=2)])
    assert batched.seeds == [5, 6]
    assert raw(batched.images[1]) == pixels(engine, make(seed=6))


# -- prompts -------------------------------------------------------------------------------------


def test_a_short_prompt_chunk_encodes_as_diffusers_does(engine: Engine) -> None:
    pipe = engine.load("tiny-xl")
    with torch.inference_mode():
        positive, _, pooled, _ = pipe.encode_prompt(
            "a red fox in snow", device=engine.device, do_classifier_free_guidance=False
        )
        ids = [pipe.tokenizer("a red fox in snow", add_special_tokens=False).input_ids]
        ours, our_pooled = _encode_sdxl_chunks(pipe, [ids, ids], 1, engine.device)
    assert _rows(pipe.tokenizer, ids, 1)[0][0][0] == pipe.tokenizer.bos_token_id
    assert ours.shape == positive.shape == (1, 77, 64)  # both encoders side by side
    torch.testing.assert_close(ours, positive)
    torch.testing.assert_close(our_pooled, pooled)


def test_a_long_prompt_is_encoded_in_chunks_with_the_pooled_of_the_first(engine: Engine) -> None:
    pipe = engine.load("tiny-xl")
    with torch.inference_mode():
        long = encode_prompt(
            pipe, make(prompt=LONG_PROMPT, negative_prompt="blurry"), cfg=True,
            device=engine.device,
        )  # fmt: skip
        first = encode_prompt(pipe, make(prompt=LONG_PROMPT[:40]), cfg=False, device=engine.device)
    assert long.tokens % 77 == 0 and long.tokens > 77
    assert long.negative is not None and long.negative.shape == long.positive.shape
    assert long.pooled is not None and long.negative_pooled is not None
    assert long.pooled.shape == (1, 32)
    assert first.negative is None and first.negative_pooled is None
    # The end of a long prompt is not cut off: it changes the image.
    cut = make(prompt=LONG_PROMPT[: len(LONG_PROMPT) // 2])
    assert pixels(engine, make(prompt=LONG_PROMPT)) != pixels(engine, cut)


# -- adapters ------------------------------------------------------------------------------------


def test_an_sdxl_lora_changes_the_image_for_its_call_only(engine: Engine) -> None:
    plain = pixels(engine, make())
    with_lora = pixels(engine, make(loras=(LoraSpec("xl-ink", 1.0),)))
    assert with_lora != plain
    assert pixels(engine, make()) == plain


def test_an_sdxl_embedding_goes_into_both_text_encoders(
    engine: Engine, model_cache: Path, tmp_path: Path
) -> None:
    # The same prompts on an engine without embeddings: the names are plain words there.
    plain = Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, catalog=Catalog.load(None, tmp_path)
    )
    for prompt in (f"a fox, {EMBEDDING}", f"{LONG_PROMPT}, {EMBEDDING}"):
        assert pixels(engine, make(prompt=prompt)) != pixels(plain, make(prompt=prompt))
    pipe = engine.load("tiny-xl")
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        # Two vectors: the name and one extra token, in each tokenizer.
        assert pipe.maybe_convert_prompt(EMBEDDING, tokenizer) == f"{EMBEDDING} {EMBEDDING}_1"
    # An SD 1.x embedding does not fit: the word stays plain text, and nothing is half-loaded.
    prompt = "a fox, sd-only"
    assert pixels(engine, make(prompt=prompt)) == pixels(plain, make(prompt=prompt))
    assert "sd-only" not in pipe.tokenizer.get_vocab()
    assert "sd-only" not in pipe.tokenizer_2.get_vocab()


def test_the_tiny_xl_build_is_reused(model_cache: Path) -> None:
    folder = ensure_tiny_xl(model_cache)
    assert folder.name == TINY_XL_DIRNAME and (folder / "text_encoder_2").is_dir()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_xl(model_cache) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
