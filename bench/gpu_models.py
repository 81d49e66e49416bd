"""Random-weight SD 1.5 and SDXL models for `sdbot bench gpu`, from configs written here.

No download: the configs are those of the published checkpoints (runwayml SD 1.5, SDXL base
1.0), the weights random, the tokenizer the tiny model's (the text encoder's cost does not
depend on its vocabulary). Speed and memory depend on shapes, not on weight values, so the
figures are those of the real models. Each model is built on the benchmark's device (random
init on a GPU takes a second; on a CPU, minutes for SDXL), saved as a diffusers folder in half
precision and then loaded through the bot's Engine like any local model.

Scales: "full" (the real shapes), "quick" (reduced shapes a CPU runs in seconds) and "tiny"
(the smallest that still has every part, for tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bot.tiny_model import build_tokenizer, build_vae, euler_scheduler, text_config
from bot.tiny_xl import sdxl_pipeline, sdxl_unet

#: Per scale: (UNet channels per block, layers per block, attention head dim, text width,
#: text layers, VAE channels per block, native size in pixels).
_SD15: dict[str, tuple[tuple[int, ...], int, int, int, int, tuple[int, ...], int]] = {
    "full": ((320, 640, 1280, 1280), 2, 8, 768, 12, (128, 256, 512, 512), 512),
    "quick": ((32, 64, 64, 64), 1, 8, 64, 2, (16, 16, 32, 32), 128),
    "tiny": ((32, 32, 32, 32), 1, 8, 32, 1, (8, 8, 16, 16), 64),
}
_SDXL: dict[str, dict[str, Any]] = {
    "full": {
        "blocks": (320, 640, 1280),
        "transformer_layers": (1, 2, 10),
        "heads": (5, 10, 20),
        "text": (768, 12, 1280, 32),  # CLIP-L, then OpenCLIP bigG: width, layers
        "time_dim": 256,
        "vae": (128, 256, 512, 512),
        "size": 1024,
    },
    "quick": {
        "blocks": (32, 64, 64),
        "transformer_layers": (1, 1, 1),
        "heads": (2, 4, 4),
        "text": (32, 1, 32, 1),
        "time_dim": 8,
        "vae": (16, 16, 32, 32),
        "size": 128,
    },
}
_SDXL["tiny"] = {**_SDXL["quick"], "vae": (8, 8, 16, 16), "size": 64}


def native_size(family: str, scale: str) -> int:
    """The size (pixels, square) the model of `family` at `scale` is made for."""
    return _SD15[scale][6] if family == "sd15" else int(_SDXL[scale]["size"])


def _text_config(tokenizer: Any, width: int, layers: int, **extra: Any) -> Any:
    # CLIP's proportions: 4x wide MLPs, 64-wide attention heads.
    return text_config(
        tokenizer,
        width=width,
        layers=layers,
        intermediate=4 * width,
        heads=max(1, width // 64),
        **extra,
    )


def _vae(blocks: tuple[int, ...], *, scaling: float, layers: int, force_upcast: bool) -> Any:
    return build_vae(
        block_out_channels=blocks,
        layers_per_block=layers,
        norm_num_groups=min(32, blocks[0]),
        sample_size=512,
        scaling_factor=scaling,
        force_upcast=force_upcast,
    )


def build_sd15(scale: str) -> Any:
    """An SD 1.5-shaped StableDiffusionPipeline with random weights, on the current device."""
    import diffusers
    from transformers import CLIPTextModel

    d: Any = diffusers
    blocks, layers, head_dim, text_width, text_layers, vae_blocks, size = _SD15[scale]
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    unet = d.UNet2DConditionModel(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=blocks,
        layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1),
        cross_attention_dim=text_width,
        attention_head_dim=head_dim,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, text_width, text_layers))
    vae_layers = 2 if scale == "full" else 1
    vae = _vae(vae_blocks, scaling=0.18215, layers=vae_layers, force_upcast=False)
    return d.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=euler_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(scale: str) -> Any:
    """An SDXL-base-shaped StableDiffusionXLPipeline with random weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shape = _SDXL[scale]
    width_1, layers_1, width_2, layers_2 = shape["text"]
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    unet = sdxl_unet(
        sample_size=int(shape["size"]) // 8,
        blocks=shape["blocks"],
        layers=2 if scale == "full" else 1,
        heads=shape["heads"],
        text_widths=(width_1, width_2),
        time_dim=int(shape["time_dim"]),
        transformer_layers=shape["transformer_layers"],
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, width_1, layers_1))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, width_2, layers_2, hidden_act="gelu")
    )
    vae_layers = 2 if scale == "full" else 1
    vae = _vae(shape["vae"], scaling=0.13025, layers=vae_layers, force_upcast=True)
    return sdxl_pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
    )


def write_model(family: str, scale: str, folder: Path, *, device: torch.device) -> Path:
    """Build the `family` ("sd15" or "sdxl") model at `scale` on `device`; save it at `folder`."""
    build = build_sd15 if family == "sd15" else build_sdxl
    # Random init where the model will run: seconds on a GPU for what takes minutes on a CPU.
    with torch.device(device):
        pipe = build(scale)
    if device.type == "cuda":
        # Half precision on disk (as fp16 variants ship): half the bytes to write and read.
        pipe.to(torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder
