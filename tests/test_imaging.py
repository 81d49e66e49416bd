"""Images in and out (bot.imaging) and typed options and input pictures as request fields
(bot.inputs): pure CPU, no model."""

from __future__ import annotations

import io
from typing import Any, cast

import pytest
from PIL import Image

from bot.errors import InvalidRequest
from bot.imaging import (
    decode_attachment,
    encode_png,
    encode_pngs,
    fit_size,
    format_parameters,
    grid_cell,
    make_grid,
    parse_parameters,
    prepare_mask,
    read_parameters,
    request_parameters,
)
from bot.inputs import (
    DEFAULT_STRENGTH,
    attachment_bytes,
    input_size,
    parse_loras,
    parse_size,
    picture_inputs,
)


def test_parameters_follow_automatic1111_line_by_line() -> None:
    text = format_parameters(
        prompt="a cat, (blue:1.2)",
        negative_prompt="blurry",
        steps=20,
        sampler="Euler a",
        guidance=7.5,
        seed=42,
        width=512,
        height=768,
        model="dreamshaper",
    )
    assert text.split("\n") == [
        "a cat, (blue:1.2)",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: dreamshaper",
    ]


def test_no_negative_prompt_line_when_empty() -> None:
    text = format_parameters(
        prompt="p", negative_prompt="", steps=1, sampler="DDIM", guidance=7.0, seed=1,
        width=64, height=64, model="m",
    )  # fmt: skip
    assert text == "p\nSteps: 1, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Model: m"


def test_png_round_trip() -> None:
    text = (
        "multi\nline prompt\nNegative prompt: bad\n"
        "Steps: 4, Sampler: PLMS, CFG scale: 7, Seed: 9, Size: 8x8, Model: builtin:tiny"
    )
    data = encode_png(Image.new("RGB", (8, 8), "red"), text)
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (255, 0, 0)
    assert read_parameters(data) == text
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "multi\nline prompt"
    assert parsed["negative_prompt"] == "bad"
    assert (
        parsed["Seed"] == "9" and parsed["Model"] == "builtin:tiny" and parsed["Sampler"] == "PLMS"
    )


def test_png_without_parameters() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert read_parameters(buf.getvalue()) is None


# -- attachments, sizes, masks, grids ----------------------------------------------------------

MB = 1_000_000
LIMITS: dict[str, Any] = {"max_bytes": 10 * MB, "max_pixels": 4096 * 4096}


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **params)
    return buf.getvalue()


def test_decode_attachment_returns_an_rgb_copy() -> None:
    data = png_bytes(Image.new("RGB", (40, 30), (10, 20, 30)))
    image = decode_attachment(data, **LIMITS)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (40, 30), (10, 20, 30))


def test_decode_attachment_transparency_white_or_kept() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    data = png_bytes(rgba)
    flat = decode_attachment(data, **LIMITS)
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((1, 1)) == (255, 0, 0)
    kept = decode_attachment(data, **LIMITS, keep_alpha=True)
    assert kept.mode == "RGBA" and kept.getchannel("A").getpixel((0, 0)) == 0
    # An opaque image stays RGB even when alpha is asked for.
    assert decode_attachment(
        png_bytes(Image.new("RGB", (4, 4))), **LIMITS, keep_alpha=True
    ).mode == ("RGB")


def test_decode_attachment_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo taken upright
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert decode_attachment(buf.getvalue(), **LIMITS).size == (20, 40)


def test_decode_attachment_takes_the_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_attachment(buf.getvalue(), **LIMITS)
    red, _green, blue = image.getpixel((8, 8))  # type: ignore[misc]
    assert red > 200 and blue < 50


def test_decode_attachment_scales_16_bit_greyscale() -> None:
    image = Image.new("I;16", (8, 8), 65535)
    decoded = decode_attachment(png_bytes(image), **LIMITS)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_every_message_names_the_one_list_of_formats_and_each_decodes() -> None:
    from types import SimpleNamespace

    from bot.discord_front import intake, limits
    from bot.imaging import ATTACHMENT_FORMATS, ATTACHMENT_FORMATS_TEXT

    text = ATTACHMENT_FORMATS_TEXT
    assert text == "PNG, JPEG, WebP, GIF or BMP" and text == limits.IMAGE_FORMATS
    said = []
    for data in (b"", b"not a picture"):
        with pytest.raises(InvalidRequest) as refused:
            decode_attachment(data, **LIMITS)
        said.append(refused.value.message)
    upload = SimpleNamespace(content_type="text/plain", size=10)
    with pytest.raises(InvalidRequest) as refused:
        intake.check_attachment(cast(Any, None), cast(Any, upload), "image")
    said.append(refused.value.message)
    assert all(text in message for message in said), said
    # And the list tells the truth: each format it names decodes.
    for name in ATTACHMENT_FORMATS:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=name)
        assert decode_attachment(buf.getvalue(), **LIMITS).size == (8, 8), name


def test_decompression_bomb_is_refused_from_the_header_alone() -> None:
    import time

    from tests.test_engine_bad_inputs import bomb_png

    # 20000x20000 pixels in 100 bytes: refused before any pixel is decoded.
    data = bomb_png(20000, 20000)
    assert len(data) < 1000
    started = time.perf_counter()
    with pytest.raises(
        InvalidRequest, match=r"too many pixels.*\(400\.0 megapixels\); the limit is 16\.8"
    ):
        decode_attachment(data, max_bytes=10 * MB, max_pixels=4096 * 4096)
    assert time.perf_counter() - started < 0.5


def test_fit_size_keeps_aspect_in_multiples_of_8() -> None:
    assert fit_size(1024, 768, max_side=512) == (512, 384)
    assert fit_size(768, 1024, max_side=512) == (384, 512)
    assert fit_size(100, 100, max_side=512) == (512, 512)  # small images go up to native size
    assert fit_size(1000, 333, max_side=512) == (512, 168)
    assert fit_size(5000, 10, max_side=512) == (512, 64)  # clamped at min_side
    assert fit_size(513, 517, max_side=513) == (512, 512)
    for w, h in ((37, 91), (1920, 1080), (1, 1)):
        out = fit_size(w, h, max_side=768)
        assert all(side % 8 == 0 and 64 <= side <= 768 for side in out)


def test_prepare_mask_from_separate_image_any_mode() -> None:
    mask = Image.new("RGB", (32, 32), "black")
    mask.paste((255, 255, 255), (0, 0, 16, 32))
    out = prepare_mask(None, mask, (64, 64))
    assert (out.mode, out.size) == ("L", (64, 64))
    assert out.getpixel((5, 5)) == 255 and out.getpixel((60, 5)) == 0
    # Strokes painted on a transparent layer: transparent = keep.
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 10, 10))
    out = prepare_mask(None, layer, (64, 64))
    assert out.getpixel((1, 1)) == 255 and out.getpixel((30, 30)) == 0


def test_prepare_mask_from_transparency() -> None:
    image = Image.new("RGBA", (64, 48), (200, 100, 50, 255))
    image.paste((0, 0, 0, 0), (0, 0, 32, 48))
    out = prepare_mask(image, None, (64, 48))
    assert out.getpixel((1, 1)) == 255 and out.getpixel((60, 1)) == 0


def test_make_grid_layouts_and_cells() -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (16, 8), c) for c in colors]
    assert make_grid(images[:1]).size == (16, 8)
    assert make_grid(images[:2]).size == (32, 8)  # 1 row x 2
    assert make_grid(images[:3]).size == (48, 8)  # 1 row x 3, as A1111
    grid = make_grid(images)
    assert grid.size == (32, 16)  # 2x2
    assert [grid.getpixel(p) for p in ((0, 0), (16, 0), (0, 8), (16, 8))] == colors
    for count in (1, 2, 3, 4):
        g = make_grid(images[:count])
        for i in range(count):
            cell = grid_cell(g, count, i)
            assert cell.size == (16, 8) and cell.getpixel((3, 3)) == colors[i]


def test_request_parameters_a1111_line_by_line() -> None:
    from bot.jobs import GenerationRequest, LoraSpec

    init = Image.new("RGB", (64, 64))
    req = GenerationRequest(
        prompt="a cat, (blue:1.2)",
        negative_prompt="blurry",
        model="tiny",
        width=64,
        height=64,
        steps=20,
        guidance=7.5,
        seed=42,
        mode="img2img",
        strength=0.6,
        init_image=init,
        loras=(LoraSpec("ink", 0.8),),
        scheduler="euler a",
    )
    text = request_parameters(req, seed=43, sampler=req.scheduler)
    assert text.split("\n") == [
        "a cat, (blue:1.2) <lora:ink:0.8>",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 43, Size: 64x64, Model: tiny, "
        "Denoising strength: 0.6",
    ]
    parsed = parse_parameters(read_parameters(encode_png(init, text)) or "")
    assert parsed["Seed"] == "43" and parsed["Denoising strength"] == "0.6"
    assert parsed["negative_prompt"] == "blurry"


def test_encode_pngs_gives_each_image_its_parameters_and_a_grid_for_several() -> None:
    images = [Image.new("RGB", (16, 8), c) for c in ("red", "green", "blue")]
    texts = [f"fox\nSteps: 2, Seed: {seed}" for seed in (7, 8, 9)]
    pngs, grid = encode_pngs(images, texts)
    assert [read_parameters(png) for png in pngs] == texts
    assert grid is not None and read_parameters(grid) == texts[0]  # A1111 labels it so
    assert Image.open(io.BytesIO(grid)).size == (48, 8)
    one, no_grid = encode_pngs(images[:1], texts[:1])
    assert len(one) == 1 and no_grid is None


def test_size_limits_count_a_megabyte_as_2_to_the_20_bytes() -> None:
    assert attachment_bytes(10) == 10 * 2**20
    assert attachment_bytes(0.5) == 2**19
    data = png_bytes(Image.new("RGB", (8, 8)))
    huge = data + b"\0" * (11 * 2**20 - len(data))  # trailing bytes after IEND: still a PNG
    with pytest.raises(InvalidRequest, match=r"is 11\.0 MB; the limit is 10\.0 MB"):
        decode_attachment(huge, max_bytes=attachment_bytes(10), max_pixels=4096 * 4096)
    # Just under 1 MB counted in binary, over it counted in decimal: allowed.
    padded = data + b"\0" * (1_040_000 - len(data))
    assert decode_attachment(padded, max_bytes=attachment_bytes(1), max_pixels=64).size == (8, 8)


def test_input_size_keeps_the_aspect_with_the_short_side_at_native() -> None:
    assert input_size(320, 200, 64) == (96, 64)
    assert input_size(200, 320, 64) == (64, 96)
    assert input_size(320, 200, 512) == (816, 512)
    assert input_size(4000, 100, 512) == (1024, 64)  # the long side capped at MAX_SIZE
    assert input_size(64, 64, 512) == (512, 512)


def test_picture_inputs_size_and_mask_a_picture_as_the_bot_does() -> None:
    picture = Image.new("RGBA", (320, 200), (200, 100, 50, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 100, 200))
    out = picture_inputs(picture, native=64)
    assert (out["width"], out["height"]) == (96, 64) and "mask_image" not in out
    assert (out["init_image"].mode, out["init_image"].size) == ("RGB", (96, 64))
    expected = picture.convert("RGB").resize((96, 64), Image.Resampling.LANCZOS)
    assert out["init_image"].tobytes() == expected.tobytes()
    # Inpaint: the transparent pixels, or a separate mask; an explicit size wins.
    out = picture_inputs(picture, native=64, size=(128, 80), inpaint=True)
    assert out["init_image"].size == out["mask_image"].size == (128, 80)
    assert out["mask_image"].getpixel((2, 40)) == 255 and out["mask_image"].getpixel((120, 40)) == 0
    mask = Image.new("L", (320, 200), 0)
    mask.paste(255, (220, 0, 320, 200))
    out = picture_inputs(picture, native=64, inpaint=True, mask=mask)
    assert out["mask_image"].getpixel((2, 30)) == 0 and out["mask_image"].getpixel((94, 30)) == 255
    # The mask is checked against the picture (96x64 is not quite 320x200's shape, and need
    # not be), so only a mask of another shape is refused.
    with pytest.raises(InvalidRequest, match="mask is 200x200 but the image is 320x200"):
        picture_inputs(picture, native=64, inpaint=True, mask=Image.new("L", (200, 200), 255))


def test_parse_size_and_loras_as_members_type_them() -> None:
    assert parse_size("768x512") == (768, 512)
    assert parse_size(" 100 × 70 ") == (96, 64)
    with pytest.raises(InvalidRequest, match="is not WIDTHxHEIGHT"):
        parse_size("big")
    known = ["style", "detail"]
    specs = parse_loras("style:0.8, detail", known)
    assert [(s.name, s.weight) for s in specs] == [("style", 0.8), ("detail", 1.0)]
    assert parse_loras("", known) == ()
    # The name ends at the first colon: a second one belongs to the weight, and is refused.
    with pytest.raises(InvalidRequest, match=r"LoRA weight '0\.8:1' for 'style' is not a number"):
        parse_loras("style:0.8:1", known)
    with pytest.raises(InvalidRequest, match=r"Unknown LoRA 'ink'\. Available: style, detail"):
        parse_loras("ink", known)


def test_default_strengths_are_the_slash_commands_ones() -> None:
    from cogs.generate import Generate

    defaults = {
        command.name: next(p.default for p in command.parameters if p.name == "strength")
        for command in Generate.__cog_app_commands__
        if command.name in DEFAULT_STRENGTH
    }
    assert defaults == DEFAULT_STRENGTH


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels", "as pixel data"])
def test_a_png_of_a_million_empty_chunks_is_refused_at_once(where: str) -> None:
    """12 MB that Pillow would walk chunk by chunk for seconds (decoding it in the end)."""
    import time

    from tests.test_png_parameters import chunk, tiny_png

    empty = chunk(b"IDAT" if where == "as pixel data" else b"prVt", b"") * 1_000_000
    data = tiny_png(after_pixels=empty) if where == "after the pixels" else tiny_png(empty)
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match=r"^The mask is a PNG with more than 4096 chunks"):
        decode_attachment(data, max_bytes=20 * MB, max_pixels=4096 * 4096, what="mask")
    assert time.perf_counter() - started < 0.5


def test_real_pngs_with_many_pixel_chunks_or_text_chunks_still_decode() -> None:
    import random
    import struct
    import zlib

    from tests.test_png_parameters import chunk

    noise = Image.frombytes("RGB", (1200, 1200), random.Random(7).randbytes(1200 * 1200 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    png = buf.getvalue()
    # The same pixels in 1 KB IDAT chunks (over 4000 of them), after 200 text chunks.
    pixels, pos, head = b"", 8, b""
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            pixels += body
        elif kind == b"IHDR":
            head = png[pos : pos + 12 + length]
        pos += 12 + length
    texts = b"".join(chunk(b"tEXt", b"Comment\0%d" % i) for i in range(200))
    parts = [chunk(b"IDAT", pixels[i : i + 1024]) for i in range(0, len(pixels), 1024)]
    assert len(parts) > 4096 and zlib.decompress(pixels)
    rebuilt = png[:8] + head + texts + b"".join(parts) + chunk(b"IEND", b"")
    decoded = decode_attachment(rebuilt, max_bytes=20 * MB, max_pixels=4096 * 4096)
    assert decoded.tobytes() == noise.tobytes()
