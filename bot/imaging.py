"""Images in and out: attachment decoding under limits, masks, sizes, grids, and PNG metadata
in the AUTOMATIC1111 `parameters` format (written and read back).

Pure CPU, no torch: callers run these off the GPU thread (decoding an attachment or encoding a
PNG is work the GPU should not wait for).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from bot.errors import InvalidRequest

# Reading the text back (bounded, linear time) lives beside; its names are part of this API.
from bot.png_parameters import MAX_PARAMETERS_BYTES as MAX_PARAMETERS_BYTES
from bot.png_parameters import MAX_PNG_CHUNKS, too_many_chunks
from bot.png_parameters import parse_parameters as parse_parameters
from bot.png_parameters import read_parameters as read_parameters

if TYPE_CHECKING:
    from bot.jobs import GenerationRequest

#: Resampling filter for photos (Pillow moved the constant; one name for every caller).
LANCZOS = Image.Resampling.LANCZOS

#: Formats an attachment may be in. An allow-list keeps Pillow's rarer (and riskier) decoders,
#: such as EPS via Ghostscript, away from untrusted uploads. (JPEG includes phones' MPO.)
ATTACHMENT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: The same list as members read it, in every message that names the formats (one list, so
#: no message offers a format the decoder refuses).
_FORMAT_WORDS = [{"WEBP": "WebP"}.get(f, f) for f in ATTACHMENT_FORMATS]
ATTACHMENT_FORMATS_TEXT = ", ".join(_FORMAT_WORDS[:-1]) + f" or {_FORMAT_WORDS[-1]}"

#: A mask pixel at or above this is "repaint" (diffusers binarises at 0.5 the same way).
MASK_THRESHOLD = 128
#: How far (relative) a mask's aspect ratio may differ from its image's before it is refused.
MASK_ASPECT_TOLERANCE = 0.02


def request_parameters(request: GenerationRequest, *, seed: int, sampler: str) -> str:
    """The `parameters` text for one image of `request` (made with `seed`).

    LoRAs go into the prompt as A1111 writes them (`<lora:name:weight>`), so A1111 and the
    sites that read its metadata apply them too.
    """
    prompt = request.prompt
    if request.loras:
        tags = " ".join(f"<lora:{lora.name}:{lora.weight:g}>" for lora in request.loras)
        prompt = f"{prompt} {tags}"
    extra: dict[str, object] = {}
    if request.mode != "txt2img":
        extra["Denoising strength"] = f"{request.strength:g}"
    return format_parameters(
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        sampler=sampler,
        guidance=request.guidance,
        seed=seed,
        width=request.width,
        height=request.height,
        model=request.model,
        extra=extra,
    )


def format_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The `parameters` text exactly as AUTOMATIC1111 writes it."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": f"{guidance:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    fields.update(extra or {})
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def preview_png(image: Image.Image) -> bytes:
    """A progress preview as PNG: speed over size (it is thrown away a second later)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_pngs(
    images: Sequence[Image.Image], parameters: Sequence[str]
) -> tuple[list[bytes], bytes | None]:
    """The PNGs of one request's images (each with its own parameters), and with more than
    one image their grid; what the bot posts and `sdbot generate` writes."""
    pngs = [encode_png(image, text) for image, text in zip(images, parameters, strict=True)]
    grid = None
    if len(images) > 1:
        # A1111 labels a grid with its first image's parameters.
        grid = encode_png(make_grid(images), parameters[0])
    return pngs, grid


# -- attachments ----------------------------------------------------------------------------


def decode_attachment(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    what: str = "image",
    keep_alpha: bool = False,
) -> Image.Image:
    """Decode an uploaded image safely: an RGB (or, with keep_alpha, RGBA) copy in memory.

    Size limits are checked on the header before any pixel is decoded, so a small file that
    claims 20000x20000 pixels costs nothing; nor does a PNG of a million empty chunks.
    Animated images give their first frame; the EXIF orientation is applied (phones store
    photos sideways). Every failure is an InvalidRequest whose message names `what` ("image",
    "mask") and the limit.
    """
    size = len(data)
    if size == 0:
        raise InvalidRequest(
            f"The {what} is empty (0 bytes). Attach a {ATTACHMENT_FORMATS_TEXT} file."
        )
    if size > max_bytes:
        raise InvalidRequest(
            f"The {what} is {_megabytes(size)}; the limit is {_megabytes(max_bytes)}. "
            "Attach a smaller file."
        )
    if too_many_chunks(data):
        # Pillow would walk every chunk, seconds of CPU for a 12 MB file of empty ones.
        raise InvalidRequest(
            f"The {what} is a PNG with more than {MAX_PNG_CHUNKS} chunks besides its pixels, "
            "more than sdbot reads. Save it again with an image editor and re-attach it."
        )
    try:
        with warnings.catch_warnings():
            # We check the pixel count ourselves below, against our own (lower) limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ATTACHMENT_FORMATS))
    except Image.DecompressionBombError as exc:
        # Pillow's own (higher) limit fired on the header; its message carries the count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f" ({_megapixels(int(found.group(1)))})" if found else ""
        raise InvalidRequest(
            f"The {what} has too many pixels to process safely{count}; the limit is "
            f"{_megapixels(max_pixels)}."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidRequest(
            f"The {what} is not an image sdbot can read; use {ATTACHMENT_FORMATS_TEXT}."
        ) from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidRequest(f"The {what} has no pixels ({width}x{height}).")
        if width * height > max_pixels:
            raise InvalidRequest(
                f"The {what} is {width}x{height} ({_megapixels(width * height)}); the limit is "
                f"{_megapixels(max_pixels)}. Attach a smaller image."
            )
        try:
            image.seek(0)  # animated GIF/PNG/WebP: the first frame
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise InvalidRequest(
                f"The {what} is truncated or corrupt; save it again and re-attach it."
            ) from None
        return _to_rgb(oriented, keep_alpha=keep_alpha)


def _to_rgb(image: Image.Image, *, keep_alpha: bool) -> Image.Image:
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: scale to 8 bits instead of clipping everything to white.
        peak = image.getextrema()[1]
        scale = 255.0 / float(peak) if isinstance(peak, (int, float)) and peak > 255 else 1.0
        image = image.point(lambda v: v * scale).convert("L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        if keep_alpha:
            return rgba
        # Transparent areas become white, as an image viewer shows them, not black.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if mode != "RGB" else image.copy()


def _megabytes(n: int | float) -> str:
    # Binary units, as Discord and SDBOT_MAX_ATTACHMENT_MB count them (1 MB = 2**20 bytes).
    if n >= 100 * 1024:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 1024:.0f} KB" if n >= 1024 else f"{n:.0f} bytes"


def _megapixels(n: int) -> str:
    return f"{n / 1_000_000:.1f} megapixels"


# -- sizes, masks, grids ----------------------------------------------------------------------


def fit_size(width: int, height: int, *, max_side: int, min_side: int = 64) -> tuple[int, int]:
    """Scale (width, height) so the long side is `max_side`, keeping the aspect ratio.

    Both sides are multiples of 8 (latents are 1/8 of the image) within [min_side, max_side];
    an extreme aspect ratio is clamped at min_side rather than producing a 1-pixel side.
    """
    if width < 1 or height < 1:
        raise InvalidRequest(f"The image has no pixels ({width}x{height}).")
    max_side = max(8, max_side - max_side % 8)
    min_side = min(max(8, min_side + (-min_side) % 8), max_side)
    scale = max_side / max(width, height)

    def snap(side: float) -> int:
        return min(max_side, max(min_side, round(side / 8) * 8))

    return snap(width * scale), snap(height * scale)


def prepare_mask(
    image: Image.Image | None, mask: Image.Image | None, size: tuple[int, int]
) -> Image.Image:
    """The inpainting mask as an "L" image of `size`: white = repaint, black = keep.

    From `mask` (a separate image in any mode, white = repaint, resized to `size`), or else
    from the transparent pixels of `image` (RGBA). Refuses masks that are empty, cover
    everything, or do not have the image's shape.
    """
    width, height = size
    if mask is not None:
        # A mask must have its image's shape; both are then resized to `size` alike. (A size
        # snapped to multiples of 8 can differ from the image's aspect by several percent at
        # small native sizes: 320x200 becomes 96x64.) Without the image, compare with `size`.
        if image is not None:
            _check_aspect(mask.size, image.size, "image")
        else:
            _check_aspect(mask.size, size, "requested size")
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            # Strokes painted on a transparent layer: transparent counts as "keep" (black).
            rgba = mask.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            grey = Image.alpha_composite(black, rgba).convert("L")
        else:
            grey = mask.convert("L")
        result = grey.resize(size, LANCZOS) if grey.size != size else grey
        origin = "mask"
    elif image is not None and image.mode in ("RGBA", "LA", "PA", "P"):
        alpha = image.convert("RGBA").getchannel("A")
        result = ImageOps.invert(alpha)  # transparent (alpha 0) -> white = repaint
        if result.size != size:
            result = result.resize(size, LANCZOS)
        origin = "transparency"
    else:
        raise InvalidRequest(
            "Inpainting needs to know what to repaint: attach a mask (white = repaint, "
            "black = keep), or an image whose areas to repaint are transparent."
        )
    low, high = _mask_extrema(result)
    if high < MASK_THRESHOLD:
        if origin == "mask":
            raise InvalidRequest(
                "The mask is empty (all black): paint the areas to repaint in white."
            )
        raise InvalidRequest(
            "The image has no transparent pixels to repaint; erase the areas to change "
            "(or attach a separate mask, white = repaint)."
        )
    if low >= MASK_THRESHOLD:
        what = "mask is all white" if origin == "mask" else "image is fully transparent"
        raise InvalidRequest(
            f"The {what}, so nothing of the image would be kept; use img2img (or /imagine) "
            "to change everything, or leave part of the image unmasked."
        )
    assert result.size == (width, height)
    return result


def _mask_extrema(mask: Image.Image) -> tuple[int, int]:
    low, high = mask.getextrema()
    return int(low), int(high)  # type: ignore[arg-type]


def _check_aspect(mask_size: tuple[int, int], other: tuple[int, int], what: str) -> None:
    mw, mh = mask_size
    ow, oh = other
    if mw < 1 or mh < 1:
        raise InvalidRequest(f"The mask has no pixels ({mw}x{mh}).")
    ratio = (mw / mh) / (ow / oh)
    if abs(ratio - 1.0) > MASK_ASPECT_TOLERANCE:
        raise InvalidRequest(
            f"The mask is {mw}x{mh} but the {what} is {ow}x{oh}; they must have the same "
            "shape. Paint the mask on a copy of the image."
        )


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows) of a grid of `count` images, as A1111 lays them out: 2 -> 2x1, 4 -> 2x2."""
    if count < 1:
        raise ValueError("a grid needs at least one image")
    rows = int(math.sqrt(count))
    while count % rows:
        rows -= 1
    return count // rows, rows


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """One image with `images` side by side (1x2 for 2, 2x2 for 4, 1x3 for 3), row by row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols, rows = grid_shape(len(images))
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, image in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        # Centre smaller images in their cell (all are the same size in practice).
        grid.paste(
            image.convert("RGB"),
            (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2),
        )
    return grid


def grid_cell(grid: Image.Image, count: int, index: int) -> Image.Image:
    """Image `index` (0-based) cut back out of a make_grid() grid of `count` images."""
    if not 0 <= index < count:
        raise InvalidRequest(f"There is no image {index + 1} in a grid of {count}.")
    cols, rows = grid_shape(count)
    cell_w, cell_h = grid.width // cols, grid.height // rows
    x, y = (index % cols) * cell_w, (index // cols) * cell_h
    return grid.crop((x, y, x + cell_w, y + cell_h))
