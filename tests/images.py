"""Small images for attachment tests, made in code."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo(size: tuple[int, int] = (96, 64), color: str = "teal") -> bytes:
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill="orange")
    return png(image)


def with_hole(size: tuple[int, int] = (64, 64)) -> bytes:
    """RGBA with a transparent square in the middle: the area to inpaint."""
    image = Image.new("RGBA", size, (200, 50, 50, 255))
    w, h = size
    ImageDraw.Draw(image).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(0, 0, 0, 0))
    return png(image)


def mask(size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2, size[1]), fill=255)
    return png(image)
