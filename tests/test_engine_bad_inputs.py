"""A corpus of bad inputs, end to end: each one is a typed sdbot error with a helpful message.

Attachments go through `imaging.decode_attachment` / `prepare_mask` (as the cogs and
`sdbot generate` do), parameters through `GenerationRequest`, names through the catalog and
the engine. Nothing may escape as a bare Pillow, torch or diffusers exception.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot import imaging
from bot.catalog import Catalog
from bot.engine import Engine
from bot.errors import InvalidRequest, ModelLoadError, SdbotError
from bot.jobs import GenerationRequest, LoraSpec

MB = 1_000_000
LIMITS = {"max_bytes": 2 * MB, "max_pixels": 2048 * 2048}


@pytest.fixture(scope="module")
def engine(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    loras = tmp_path_factory.mktemp("loras")
    (loras / "real.safetensors").write_bytes(b"x")
    return Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, catalog=Catalog.load(None, loras)
    )


def encoded(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


PNG = encoded(Image.new("RGB", (64, 64), (40, 80, 120)))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no pixel data: what a
    decompression bomb looks like before decoding (built by hand, so it costs nothing)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    pixels = zlib.compress(b"\x00" * (1 + width // 8) * 4)  # four rows; the rest is missing
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def decode(data: bytes, **limits: Any) -> Callable[[Engine], object]:
    return lambda _: imaging.decode_attachment(data, **{**LIMITS, **limits})


def request(**overrides: Any) -> Callable[[Engine], object]:
    fields: dict[str, Any] = {"prompt": "a fox", "model": "tiny", "width": 64, "height": 64}
    fields.update(overrides)
    return lambda _: GenerationRequest(**fields)


def generate(**overrides: Any) -> Callable[[Engine], object]:
    fields: dict[str, Any] = {
        "prompt": "a fox",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 2,
    }
    fields.update(overrides)
    return lambda engine: engine.generate([GenerationRequest(**fields)])


def mask(image: Image.Image | None, mask_image: Image.Image | None) -> Callable[[Engine], object]:
    return lambda _: imaging.prepare_mask(image, mask_image, (64, 64))


RGB = Image.new("RGB", (64, 64))
WHITE = Image.new("L", (64, 64), 255)
HALF = Image.new("L", (64, 64), 0)
HALF.paste(255, (0, 0, 32, 64))
OPAQUE_RGBA = Image.new("RGBA", (64, 64), (1, 2, 3, 255))
CLEAR_RGBA = Image.new("RGBA", (64, 64), (1, 2, 3, 0))

CASES: list[tuple[str, Callable[[Engine], object], type[SdbotError], str]] = [
    # attachments
    ("zero bytes", decode(b""), InvalidRequest, "empty (0 bytes)"),
    ("not an image", decode(b"<html>hello</html>"), InvalidRequest, "not an image sdbot can"),
    ("random bytes", decode(bytes(range(256)) * 20), InvalidRequest, "not an image"),
    ("truncated PNG", decode(PNG[: len(PNG) // 2]), InvalidRequest, "truncated or corrupt"),
    ("truncated JPEG", decode(encoded(Image.effect_noise((64, 64), 50), "JPEG")[:600]),
     InvalidRequest, "truncated or corrupt"),
    ("too many bytes", decode(PNG, max_bytes=100), InvalidRequest,
     "is 156 bytes; the limit is 100 bytes"),
    ("20000x20000 bomb", decode(bomb_png(20000, 20000)), InvalidRequest,
     "too many pixels to process safely (400.0 megapixels)"),
    ("huge dimensions", decode(bomb_png(9000, 3000)), InvalidRequest,
     "9000x3000 (27.0 megapixels); the limit is 4.2 megapixels"),
    ("TIFF (not allowed)", decode(encoded(Image.new("RGB", (8, 8)), "TIFF")), InvalidRequest,
     f"use {imaging.ATTACHMENT_FORMATS_TEXT}"),
    # masks
    ("mask of the wrong shape", mask(RGB, Image.new("L", (64, 32), 255)), InvalidRequest,
     "The mask is 64x32 but the image is 64x64"),
    ("empty mask", mask(None, Image.new("L", (64, 64), 0)), InvalidRequest, "mask is empty"),
    ("all-white mask", mask(None, WHITE), InvalidRequest, "mask is all white"),
    ("no mask, no transparency", mask(RGB, None), InvalidRequest, "attach a mask"),
    ("opaque RGBA, no mask", mask(OPAQUE_RGBA, None), InvalidRequest, "no transparent pixels"),
    ("fully transparent", mask(CLEAR_RGBA, None), InvalidRequest, "image is fully transparent"),
    ("mask not the image's size", request(mode="inpaint", init_image=RGB,
     mask_image=Image.new("L", (32, 32))), InvalidRequest, "mask is 32x32 but the image is 64x64"),
    # parameters
    ("unknown scheduler", request(scheduler="Euler b"), InvalidRequest,
     "Unknown scheduler 'Euler b'. Use one of: default, Euler, Euler a"),
    ("NaN guidance", request(guidance=float("nan")), InvalidRequest, "guidance nan is out of"),
    ("negative seed", request(seed=-1), InvalidRequest, "seed -1 is out of range; use 0 to"),
    ("count 5", request(count=5), InvalidRequest, "count 5 is out of range; use 1 to 4"),
    ("size not a multiple of 8", request(width=100), InvalidRequest, "try 96"),
    ("huge size", request(width=4096), InvalidRequest, "width 4096 is out of range"),
    ("strength 0", request(mode="img2img", init_image=RGB, strength=0.0), InvalidRequest,
     "strength 0.0 is out of range"),
    ("no denoising step", request(mode="img2img", init_image=RGB, strength=0.1, steps=5),
     InvalidRequest, "leaves no denoising step; use at least 10 steps"),
    ("img2img without image", request(mode="img2img"), InvalidRequest, "needs an input image"),
    ("unknown mode", request(mode="outpaint"), InvalidRequest, "mode 'outpaint' is unknown"),
    ("NaN LoRA weight", request(loras=(LoraSpec("real", float("nan")),)), InvalidRequest,
     "LoRA weight nan for 'real' is out of range"),
    ("LoRA path", request(loras=(LoraSpec("../../etc/passwd", 1.0),)), InvalidRequest,
     "is not valid"),
    ("LoRA twice", request(loras=(LoraSpec("real", 1.0), LoraSpec("real", 0.5))), InvalidRequest,
     "same LoRA was given twice"),
    # names, resolved at generation time
    ("unknown model", generate(model="stable-diffusion-9"), InvalidRequest,
     "Unknown model 'stable-diffusion-9'. Available: tiny, "),
    ("missing model folder", generate(model="/nonexistent/sd15"), ModelLoadError,
     "The model folder of model `sd15` does not exist"),
    ("unknown LoRA", generate(loras=(LoraSpec("nope", 1.0),)), InvalidRequest,
     "Unknown LoRA 'nope'. Available: real."),
    ("LoRA file that is not a LoRA", generate(loras=(LoraSpec("real", 1.0),)), InvalidRequest,
     "The LoRA 'real' does not fit model 'tiny'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "action", "error", "message"), CASES, ids=[case[0] for case in CASES]
)
def test_bad_input_gives_a_typed_helpful_error(
    engine: Engine, name: str, action: Callable[[Engine], object], error: type, message: str
) -> None:
    with pytest.raises(SdbotError) as info:
        action(engine)
    assert type(info.value) is error, f"{name}: {type(info.value).__name__}"
    assert message in info.value.message, info.value.message
    # Messages are for people: one sentence or two, no traceback or repr noise.
    assert "Traceback" not in info.value.message and len(info.value.message) < 300


def test_engine_still_works_after_the_corpus(engine: Engine) -> None:
    image = engine.generate([GenerationRequest(prompt="a fox", model="tiny", width=64,
                                               height=64, steps=2)])[0].images[0]  # fmt: skip
    assert image.size == (64, 64)
