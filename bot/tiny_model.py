"""A tiny random-weight Stable Diffusion model, built offline.

It exists so tests, CI and a machine without the Hub can exercise the real
diffusers loading and sampling code. Images are noise-like, but the pipeline,
file layout and tokenizer are the same kind a real SD 1.x checkpoint uses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Folder name under the cache dir. Bump the suffix whenever the architecture or
#: seed changes, so an old build on disk is never mistaken for the new one.
TINY_MODEL_DIRNAME = "tiny-sd-v1"
#: The 9-input-channel variant (like sd-v1-5-inpainting), for the native inpainting path.
TINY_INPAINT_DIRNAME = "tiny-sd-inpaint-v1"

#: Weights are seeded so two builds are byte-identical and test images are stable.
TINY_MODEL_SEED = 0

#: SD 1.x uses a 77-token text context; matching it makes prompt truncation behave as in
#: real models.
MAX_TOKENS = 77

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# A few merges so the BPE model actually merges something; the choice is arbitrary.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"),
    ("in", "g</w>"), ("o", "n</w>"), ("e", "r</w>"), ("r", "e"), ("o", "f</w>"),
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's byte -> printable-character table; byte-level BPE needs all 256 of them."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    # Same ordering as CLIP's own vocab: bytes, bytes + "</w>", merges, then specials.
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in _MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [f"{a} {b}" for a, b in _MERGES]
    return vocab, merges


def _diffusers() -> Any:
    # Imported lazily (it takes seconds) and typed as Any: diffusers ships py.typed but
    # its constructors are unannotated, which strict mypy rejects call by call.
    import diffusers

    return diffusers


def build_tokenizer() -> Any:
    """The tiny models' CLIP tokenizer (byte-level BPE, 77-token context)."""
    from transformers import CLIPTokenizer

    # Load from vocab.json + merges.txt on disk, the files real SD repos ship, because
    # that is the path transformers 5 converts them on; its CLIPTokenizer(vocab_file=...)
    # constructor silently ignores the files and yields a 2-token vocabulary.
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="sdbot-tiny-tokenizer-") as tmp:
        src = Path(tmp)
        (src / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (src / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(
            str(src),
            model_max_length=MAX_TOKENS,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            local_files_only=True,
        )


def _build_components(tokenizer: Any, *, inpainting: bool = False) -> dict[str, Any]:
    d = _diffusers()
    from transformers import CLIPTextConfig, CLIPTextModel

    # Seed before each module so one module's size never shifts another's weights.
    torch.manual_seed(TINY_MODEL_SEED)
    unet = d.UNet2DConditionModel(
        sample_size=8,
        # Inpainting UNets also take the mask (1) and the masked image's latents (4).
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )

    vae = build_vae()

    torch.manual_seed(TINY_MODEL_SEED)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)

    # SD 1.x's training noise schedule; Euler runs exactly `steps` UNet calls
    # (PNDM adds one), which keeps step counts in progress reports simple.
    scheduler = d.EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def build_vae(**overrides: Any) -> Any:
    """The tiny models' AutoencoderKL (seeded); `overrides` change its config."""
    torch.manual_seed(TINY_MODEL_SEED)
    # Four blocks -> three 2x downsamples -> vae_scale_factor 8, as in real SD.
    config: dict[str, Any] = {
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
    }
    return _diffusers().AutoencoderKL(in_channels=3, out_channels=3, **{**config, **overrides})


def write_tiny_model(path: Path, *, inpainting: bool = False) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors) at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    components = _build_components(tokenizer, inpainting=inpainting)
    d = _diffusers()
    # model_index.json names the pipeline class, as real inpainting repos do.
    pipeline_cls = d.StableDiffusionInpaintPipeline if inpainting else d.StableDiffusionPipeline
    pipe = pipeline_cls(
        **components,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def _is_complete(model_dir: Path) -> bool:
    # Only the atomic rename in ensure_tiny_model publishes a folder, so a final dir
    # holding model_index.json is a finished build.
    return (model_dir / "model_index.json").is_file()


def ensure_tiny_model(cache_dir: Path, *, inpainting: bool = False) -> Path:
    """Return `cache_dir / "tiny-sd-v1"` (or the inpainting variant), built once."""
    dirname = TINY_INPAINT_DIRNAME if inpainting else TINY_MODEL_DIRNAME
    return ensure_built(cache_dir, dirname, lambda to: write_tiny_model(to, inpainting=inpainting))


def ensure_built(cache_dir: Path, dirname: str, write: Callable[[Path], Any]) -> Path:
    """`cache_dir / dirname`, written by `write(folder)` once (atomically) if not there yet."""
    cache_dir = Path(cache_dir)
    final = cache_dir / dirname
    if _is_complete(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # Only a build from outside this function could leave this; it cannot be trusted.
        shutil.rmtree(final, ignore_errors=True)
    # Build beside the final dir (same filesystem) so the rename is atomic: a crash
    # leaves only a stray temp dir, and concurrent builders race on the rename alone.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=cache_dir))
    try:
        write(tmp)
        # mkdtemp makes the dir owner-only; the cache may be shared with other users.
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            # Another process finished first; its build is identical, so use it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- the original (CompVis/A1111) single-file layout ----------------------------------------
#
# Single .safetensors checkpoints from Civitai and A1111 use the key names of the original
# latent-diffusion code. diffusers reads them with `from_single_file`; these functions write
# that layout from a diffusers folder, the inverse of diffusers' converters
# (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`)
# for SD 1.x-style UNets and VAEs of any depth. Used to test the single-file path offline.

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
