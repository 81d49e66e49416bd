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

# Re-exported: the single-file writers were defined here first (bot/cli.py, tests use them).
from bot.tiny_single_file import unet_to_original as unet_to_original
from bot.tiny_single_file import vae_to_original as vae_to_original
from bot.tiny_single_file import write_config_folder as write_config_folder
from bot.tiny_single_file import write_single_file as write_single_file

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
    from transformers import CLIPTextModel

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
    text_encoder = CLIPTextModel(text_config(tokenizer, width=32, layers=2))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": euler_scheduler(),
    }


def text_config(
    tokenizer: Any,
    *,
    width: int,
    layers: int,
    intermediate: int | None = None,
    heads: int = 4,
    **extra: Any,
) -> Any:
    """A CLIP text encoder's config for `tokenizer`: `width` wide (also its projection),
    `layers` deep; `intermediate` defaults to 2x width (the tiny models')."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate or 2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def euler_scheduler() -> Any:
    """SD's (and SDXL base's) training noise schedule with Euler, leading spacing: Euler runs
    exactly `steps` UNet calls (PNDM adds one), which keeps step counts simple."""
    return _diffusers().EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


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
