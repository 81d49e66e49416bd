"""A tiny random-weight SDXL model (`builtin:tiny-xl`), built offline.

The SDXL counterpart of `bot.tiny_model`: the same kind of parts a real SDXL repo has (two
CLIP text encoders, the second with a projection whose pooled output conditions the UNet
together with the size "time ids", and a UNet with `addition_embed_type="text_time"`), saved
with save_pretrained and loaded with from_pretrained like any SDXL folder, so tests exercise
diffusers' SDXL pipelines for real. Images are noise-like; a 64 px image takes a fraction of a
second on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bot.tiny_model import (
    TINY_MODEL_SEED,
    build_tokenizer,
    build_vae,
    ensure_built,
    euler_scheduler,
    text_config,
)

#: Folder name under the cache dir; bump the suffix whenever the architecture or seed changes.
TINY_XL_DIRNAME = "tiny-sdxl-v1"

#: Each text encoder's width; the UNet's cross-attention takes both side by side.
_TEXT_DIM = 32
#: Width of each of the six size/crop "time ids" (SDXL: 256).
_TIME_ID_DIM = 8


def sdxl_unet(
    *,
    sample_size: int,
    blocks: tuple[int, ...],
    layers: int,
    heads: Any,
    text_widths: tuple[int, int],
    time_dim: int,
    transformer_layers: Any = 1,
) -> Any:
    """An SDXL-shaped UNet2DConditionModel (random weights): no attention in the top block,
    both encoders' text side by side, the pooled text (as wide as the second encoder) and
    six size/crop "time ids" as the added conditioning. `bench.gpu_models` builds the real
    SDXL shapes with it."""
    import diffusers

    d: Any = diffusers  # its constructors are unannotated, which strict mypy rejects
    return d.UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=blocks,
        layers_per_block=layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(blocks) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(blocks) - 1) + ("UpBlock2D",),
        transformer_layers_per_block=transformer_layers,
        cross_attention_dim=sum(text_widths),
        attention_head_dim=heads,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # Six time ids (original size, crop corner, target size) plus the pooled text.
        projection_class_embeddings_input_dim=6 * time_dim + text_widths[1],
        norm_num_groups=32,
    )


def sdxl_pipeline(
    *, unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any, tokenizer: Any
) -> Any:
    """A StableDiffusionXLPipeline of these parts, with the tiny tokenizer for both encoders
    and Euler."""
    import diffusers

    d: Any = diffusers
    return d.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=euler_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_xl() -> Any:
    """The tiny SDXL pipeline (StableDiffusionXLPipeline), seeded so builds are identical."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    # Seed before each module so one module's size never shifts another's weights.
    torch.manual_seed(TINY_MODEL_SEED)
    unet = sdxl_unet(
        sample_size=8,
        blocks=(32, 64),
        layers=1,
        heads=(2, 4),
        text_widths=(_TEXT_DIM, _TEXT_DIM),
        time_dim=_TIME_ID_DIM,
    )
    # SDXL's VAE scaling, and its flag that fp16 decoding needs an upcast.
    vae = build_vae(scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(TINY_MODEL_SEED)
    # SDXL reads the penultimate hidden state; three layers keep it a transformed one.
    text_encoder = CLIPTextModel(text_config(tokenizer, width=_TEXT_DIM, layers=3))
    torch.manual_seed(TINY_MODEL_SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, width=_TEXT_DIM, layers=3))
    return sdxl_pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
    )


def write_tiny_xl(path: Path) -> Path:
    """Build the tiny SDXL pipeline and save it as a diffusers folder (safetensors) at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_xl().save_pretrained(str(path), safe_serialization=True)
    return path


def ensure_tiny_xl(cache_dir: Path) -> Path:
    """Return `cache_dir / TINY_XL_DIRNAME`, built once."""
    return ensure_built(cache_dir, TINY_XL_DIRNAME, write_tiny_xl)
