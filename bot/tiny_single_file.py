"""The original (CompVis/A1111) single-file layout, written from a diffusers folder.

Single .safetensors checkpoints from Civitai and A1111 use the key names of the original
latent-diffusion code. diffusers reads them with `from_single_file`; these functions write
that layout from a diffusers folder, the inverse of diffusers' converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`)
for SD 1.x-style UNets and VAEs of any depth. Used to test the single-file path offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_RENAMES = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _rename_first(rest: str, renames: tuple[tuple[str, str], ...]) -> str:
    """Rename the leading module name of `rest` ("conv1.weight" -> "in_layers.2.weight")."""
    for old, new in renames:
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """diffusers UNet2DConditionModel weights -> `model.diffusion_model.*` keys."""
    per_block = int(config["layers_per_block"])
    n_down = len(config["down_block_types"])
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        module, leaf = ".".join(parts[:-1]), parts[-1]
        if module in fixed:
            new = f"{fixed[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            block, kind, index = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "downsamplers":  # the block's extra input block after its layers
                slot = 1 + block * (per_block + 1) + per_block
                new = f"input_blocks.{slot}.0.op.{rest.removeprefix('conv.')}"
            else:
                slot = 1 + block * (per_block + 1) + index
                if kind == "resnets":
                    new = f"input_blocks.{slot}.0.{_rename_first(rest, _RESNET_RENAMES)}"
                else:
                    new = f"input_blocks.{slot}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":  # resnet, attention, resnet
                new = f"middle_block.{index * 2}.{_rename_first(rest, _RESNET_RENAMES)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind, index = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            has_attention = "CrossAttn" in config["up_block_types"][block]
            if kind == "upsamplers":  # rides in the block's last output block
                slot = block * (per_block + 1) + per_block
                new = f"output_blocks.{slot}.{2 if has_attention else 1}.{rest}"
            else:
                slot = block * (per_block + 1) + index
                if kind == "resnets":
                    new = f"output_blocks.{slot}.0.{_rename_first(rest, _RESNET_RENAMES)}"
                else:
                    new = f"output_blocks.{slot}.1.{rest}"
        else:
            raise ValueError(f"no original-layout name for UNet weight {key} ({n_down} blocks)")
        out[_UNET_PREFIX + new] = value
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL weights -> `first_stage_model.*` keys."""
    n_up = len(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv") or parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        elif parts[1] == "down_blocks":
            block, kind, rest = int(parts[2]), parts[3], ".".join(parts[5:])
            if kind == "downsamplers":
                new = f"{side}.down.{block}.downsample.{rest}"
            else:
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.down.{block}.block.{parts[4]}.{rest}"
        elif parts[1] == "up_blocks":
            # diffusers counts decoder blocks from the bottom, the original from the top.
            block, kind, rest = n_up - 1 - int(parts[2]), parts[3], ".".join(parts[5:])
            if kind == "upsamplers":
                new = f"{side}.up.{block}.upsample.{rest}"
            else:
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.up.{block}.block.{parts[4]}.{rest}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            rest = _rename_first(".".join(parts[4:]), _VAE_ATTENTION_RENAMES)
            new = f"{side}.mid.attn_1.{rest}"
            if value.ndim == 2:  # the original uses 1x1 convolutions for q, k, v and proj_out
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no original-layout name for VAE weight {key}")
        out[_VAE_PREFIX + new] = value
    return out


def write_single_file(model_dir: Path, path: Path) -> Path:
    """Save the diffusers SD folder `model_dir` as one original-layout .safetensors file."""
    from safetensors.torch import load_file, save_file

    model_dir, path = Path(model_dir), Path(path)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    unet = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(str(model_dir / "text_encoder" / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_original(unet, unet_config))
    state.update(vae_to_original(vae, vae_config))
    # transformers 5 saves CLIPTextModel without its old `text_model.` level; checkpoints have it.
    state.update({_CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in text.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_config_folder(model_dir: Path, path: Path) -> Path:
    """Copy `model_dir` without its weights: the `config` a single-file checkpoint needs."""
    model_dir, path = Path(model_dir), Path(path)
    weights = {".safetensors", ".bin", ".ckpt", ".pt"}
    for file in model_dir.rglob("*"):
        if file.is_file() and file.suffix not in weights:
            target = path / file.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return path
