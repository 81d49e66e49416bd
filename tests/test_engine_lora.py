"""LoRAs and textual-inversion embeddings on the tiny model (real peft adapters, no mocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from bot.catalog import Catalog
from bot.engine import MAX_CACHED_LORAS, Engine
from bot.errors import InvalidRequest
from bot.jobs import GenerationRequest, LoraSpec
from bot.tiny_model import ensure_tiny_model

EMBEDDING = "sdbot-style"


def write_tiny_lora(model_dir: Path, path: Path, *, seed: int, text_encoder: bool = False) -> Path:
    """A LoRA for the tiny model: random non-zero weights on the UNet attention layers (and
    optionally the text encoder), saved the way diffusers' training scripts save them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe: Any = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(seed)
    # init_lora_weights=False: both LoRA matrices random, so the adapter changes the output.
    unet_config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )  # fmt: skip
    pipe.unet.add_adapter(unet_config)
    layers: dict[str, Any] = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text_encoder:
        text_config = LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        )  # fmt: skip
        pipe.text_encoder.add_adapter(text_config)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True, **layers
    )
    return path


@pytest.fixture(scope="module")
def lora_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    model = ensure_tiny_model(model_cache)
    write_tiny_lora(model, folder / "ink.safetensors", seed=1)
    write_tiny_lora(model, folder / "paper.safetensors", seed=2, text_encoder=True)
    # Made for a bigger model: every matrix has the wrong shape.
    state = load_file(str(folder / "ink.safetensors"))
    bigger = {k: torch.randn(v.shape[0] * 2, v.shape[1] * 2) for k, v in state.items()}
    save_file(bigger, str(folder / "sdxl-only.safetensors"))
    (folder / "embeddings").mkdir()
    torch.manual_seed(3)
    # The A1111 .pt layout would work too; this is the diffusers one (token -> vector).
    save_file(
        {EMBEDDING: torch.randn(1, 32) * 5}, str(folder / "embeddings" / f"{EMBEDDING}.safetensors")
    )
    return folder


@pytest.fixture(scope="module")
def engine(model_cache: Path, lora_dir: Path) -> Engine:
    return Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, catalog=Catalog.load(None, lora_dir)
    )


def make(*loras: tuple[str, float], **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a red fox in snow",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 7,
        "loras": tuple(LoraSpec(name, weight) for name, weight in loras),
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def pixels(engine: Engine, request: GenerationRequest) -> bytes:
    return engine.generate([request])[0].images[0].tobytes()


def test_lora_changes_the_image_and_leaves_no_trace(engine: Engine) -> None:
    plain = pixels(engine, make())
    with_lora = pixels(engine, make(("ink", 1.0)))
    assert with_lora != plain
    assert pixels(engine, make(("ink", 1.0))) == with_lora  # deterministic with a LoRA too
    assert pixels(engine, make(("ink", 0.5))) not in (plain, with_lora)  # the weight counts
    # Removed: the next request without a LoRA is exactly the plain model again.
    assert pixels(engine, make()) == plain


def test_lora_with_text_encoder_layers_and_two_loras_at_once(engine: Engine) -> None:
    plain = pixels(engine, make())
    paper = pixels(engine, make(("paper", 1.0)))
    both = pixels(engine, make(("ink", 1.0), ("paper", 1.0)))
    assert len({plain, paper, both}) == 3
    assert pixels(engine, make(("paper", 1.0))) == paper  # ink is inactive again
    assert pixels(engine, make()) == plain


def test_lora_applies_in_every_mode(engine: Engine) -> None:
    from PIL import Image

    image = Image.new("RGB", (64, 64), (120, 60, 30))
    base = {"mode": "img2img", "init_image": image, "strength": 0.8}
    assert pixels(engine, make(("ink", 1.0), **base)) != pixels(engine, make(**base))


def test_lora_weights_are_cached_as_adapters(engine: Engine, lora_dir: Path) -> None:
    pixels(engine, make(("ink", 1.0)))
    loaded = engine.models.get("tiny")
    adapter = loaded.loras["ink"][0]
    pixels(engine, make(("ink", 0.7)))
    assert loaded.loras["ink"][0] == adapter  # not loaded a second time
    assert len(loaded.loras) <= MAX_CACHED_LORAS


def test_unknown_and_incompatible_loras_are_invalid_requests(engine: Engine) -> None:
    plain = pixels(engine, make())
    with pytest.raises(InvalidRequest, match=r"Unknown LoRA 'nope'\. Available: ink, paper"):
        engine.generate([make(("nope", 1.0))])
    with pytest.raises(InvalidRequest, match="does not fit model 'tiny'"):
        engine.generate([make(("sdxl-only", 1.0))])
    # A refused LoRA leaves nothing behind.
    assert pixels(engine, make()) == plain
    assert pixels(engine, make(("ink", 1.0))) != plain


def test_textual_inversion_embedding_by_name_in_the_prompt(
    engine: Engine, model_cache: Path, tmp_path: Path
) -> None:
    prompt = f"a red fox, {EMBEDDING}"
    without_folder = Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, catalog=Catalog.load(None, tmp_path)
    )
    assert pixels(engine, make(prompt=prompt)) != pixels(without_folder, make(prompt=prompt))
    assert EMBEDDING in engine.models.get("tiny").embeddings
    # Prompts that do not name it are unaffected.
    assert pixels(engine, make()) == pixels(without_folder, make())
