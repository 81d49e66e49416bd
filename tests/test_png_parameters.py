"""Reading `parameters` text back out of members' PNGs (bot.png_parameters, re-exported by
bot.imaging): bounded whatever the upload holds, linear time, the same fields as before."""

from __future__ import annotations

import io
import os
import random
import re
import struct
import time
import zlib
from collections.abc import Callable

import pytest
from PIL import Image, PngImagePlugin

from bot.errors import InvalidRequest
from bot.imaging import MAX_PARAMETERS_BYTES, encode_png, parse_parameters, read_parameters

#: Far below the seconds (or hours) the old pattern took, far above the few ms these take, so
#: a slow, shared CI machine does not make it flaky.
FAST = 0.5

#: The pattern parse_parameters used before: quadratic on a long line without a colon,
#: exponential on backslashes after a quote. The reference its results are checked against.
OLD_FIELDS = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def tiny_png(*extra: bytes, after_pixels: bytes = b"") -> bytes:
    """An 8x8 PNG with `extra` chunks before its pixels (and `after_pixels` after them)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    data = buf.getvalue()
    idat = data.index(b"IDAT") - 4
    iend = data.index(b"IEND") - 4
    return data[:idat] + b"".join(extra) + data[idat:iend] + after_pixels + data[iend:]


def ztxt(text: bytes) -> bytes:
    return chunk(b"zTXt", b"parameters\0\0" + zlib.compress(text))


def itxt(text: str, *, compressed: bool) -> bytes:
    body = text.encode("utf-8")
    flag = b"\1\0" if compressed else b"\0\0"
    return chunk(
        b"iTXt", b"parameters\0" + flag + b"en\0\0" + (zlib.compress(body) if compressed else body)
    )


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def read_and_parse(data: bytes) -> dict[str, str]:
    text = read_parameters(data)
    assert text is not None
    return parse_parameters(text)


# -- adversarial texts: fast, and still parsed right ------------------------------------------

LIMIT = MAX_PARAMETERS_BYTES
ADVERSARIAL: dict[str, tuple[str, dict[str, str]]] = {
    # The issue's shape, at the limit: the old pattern tried every start, each to the end.
    "one long word": ("x\n" + "a" * (LIMIT - 2), {}),
    "words without a colon": ("x\n" + "a " * (LIMIT // 2 - 1), {}),
    "many commas": ("x\n" + "," * (LIMIT - 2), {}),
    "many colons": ("x\n" + ":" * (LIMIT - 2), {}),
    "many quotes": ("x\n" + 'k: "' * (LIMIT // 4 - 1), {"k": '"' + 'k: "' * (LIMIT // 4 - 2)}),
    "key: repeated": (
        "x\n" + "key: " * (LIMIT // 5 - 1),
        {"key": "key: " * (LIMIT // 5 - 3) + "key:"},
    ),
    "backslashes after a quote": ('x\nk: "' + "\\" * (LIMIT - 6), {"k": '"' + "\\" * (LIMIT - 6)}),
    "escaped quotes": ('x\nk: "' + '\\"' * (LIMIT // 2 - 4), {"k": '"' + '\\"' * (LIMIT // 2 - 4)}),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize("packing", ["zTXt", "iTXt"])
def test_adversarial_parameters_parse_fast_and_right(name: str, packing: str) -> None:
    if name == "backslashes after a quote":
        # A canary first: the old pattern took seconds on 36 backslashes, twice that
        # for every 2 more, so without the fix this fails here instead of hanging on the rest.
        canary = 'x\nk: "' + "\\" * 36
        parsed, seconds = timed(lambda: parse_parameters(canary))
        assert seconds < FAST
    text, fields = ADVERSARIAL[name]
    assert len(text.encode()) <= LIMIT
    data = tiny_png(ztxt(text.encode()) if packing == "zTXt" else itxt(text, compressed=True))
    parsed, seconds = timed(lambda: read_and_parse(data))
    assert seconds < FAST, f"{name}: {seconds:.3f} s"
    assert parsed == {"prompt": "x", "negative_prompt": "", **fields}


def test_the_issues_40000_character_text_is_refused_at_once() -> None:
    text = "x\n" + "a" * 40000
    for data in (tiny_png(ztxt(text.encode())), tiny_png(itxt(text, compressed=True))):
        started = time.perf_counter()
        with pytest.raises(InvalidRequest, match=r"longer than 16 KB, more than sdbot reads"):
            read_parameters(data)
        assert time.perf_counter() - started < FAST
    with pytest.raises(InvalidRequest, match="longer than 16 KB"):
        parse_parameters(text)  # text from elsewhere is held to the same limit


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"x\n" + b"a" * 2**20, id="1 MB inflated"),
        pytest.param(os.urandom(2**20), id="1 MB compressed"),
    ],
)
def test_a_megabyte_text_chunk_is_refused_without_reading_it_all(body: bytes) -> None:
    for packing in (ztxt(body), chunk(b"tEXt", b"parameters\0" + body)):
        data = tiny_png(packing)
        started = time.perf_counter()
        with pytest.raises(InvalidRequest, match="longer than 16 KB"):
            read_parameters(data)
        assert time.perf_counter() - started < FAST
    assert PngImagePlugin.MAX_TEXT_CHUNK == 1024 * 1024  # Pillow's own limits left alone


def test_a_million_empty_chunks_cost_nothing() -> None:
    data = tiny_png(chunk(b"prVt", b"") * 1_000_000, ztxt(b"p\nSteps: 1"))
    text, seconds = timed(lambda: read_parameters(data))
    assert text is None  # given up on after a few thousand chunks
    assert seconds < FAST


# -- the same results as before ---------------------------------------------------------------


def test_fields_match_the_old_pattern_on_random_lines() -> None:
    """Short random lines of the characters that matter: the old pattern is quick on these, and
    every key and value must come out as it gave them, backslashes and quotes included."""
    alphabet = 'ab_1 \t:,"\\-é\u00a0\r'
    rng = random.Random(20240607)
    for _ in range(20000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        expected = {k.strip(): v.strip() for k, v in OLD_FIELDS.findall(line)}
        parsed = parse_parameters("p\n" + line)
        del parsed["prompt"], parsed["negative_prompt"]
        assert parsed == expected, repr(line)


def test_automatic1111_text_with_quoted_values() -> None:
    text = (
        "masterpiece, a cat: sitting\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5, Lora hashes: "ink: 3a1b2c, detail: 9f00aa", '
        'Template: "a \\"quoted\\" word, then more", Hires upscaler: R-ESRGAN 4x+, '
        "Version: v1.6.0"
    )
    assert parse_parameters(text) == {
        "prompt": "masterpiece, a cat: sitting",
        "negative_prompt": "blurry, lowres",
        "Steps": "30",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7",
        "Seed": "1234",
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5",
        "Lora hashes": '"ink: 3a1b2c, detail: 9f00aa"',
        "Template": '"a \\"quoted\\" word, then more"',
        "Hires upscaler": "R-ESRGAN 4x+",
        "Version": "v1.6.0",
    }


def test_every_text_chunk_kind_and_place() -> None:
    text = "a fox\nSteps: 2, Seed: 7"
    unicode = "ein Fuchs 🦊\nSteps: 2, Seed: 7"
    assert read_parameters(encode_png(Image.new("RGB", (8, 8)), text)) == text  # tEXt
    assert read_parameters(encode_png(Image.new("RGB", (8, 8)), unicode)) == unicode  # iTXt
    assert read_parameters(tiny_png(ztxt(text.encode()))) == text
    assert read_parameters(tiny_png(itxt(unicode, compressed=True))) == unicode
    assert read_parameters(tiny_png(itxt(unicode, compressed=False))) == unicode
    # Text chunks may follow the pixels (Pillow's Image.open did not read those).
    assert read_parameters(tiny_png(after_pixels=ztxt(text.encode()))) == text
    # Another keyword is not the parameters; the first `parameters` chunk counts.
    other = chunk(b"tEXt", b"Comment\0" + text.encode())
    assert read_parameters(tiny_png(other)) is None
    second = chunk(b"tEXt", b"parameters\0second")
    assert read_parameters(tiny_png(ztxt(text.encode()), second)) == text


def test_damaged_or_foreign_data_gives_none() -> None:
    good = tiny_png(ztxt(b"p\nSteps: 1"))
    assert read_parameters(good) == "p\nSteps: 1"
    at = good.index(b"zTXt")
    flipped = good[: at + 20] + bytes([good[at + 20] ^ 1]) + good[at + 21 :]
    assert read_parameters(flipped) is None  # fails its checksum
    assert read_parameters(good[: at + 10]) is None  # cut off inside the chunk
    assert read_parameters(tiny_png(chunk(b"zTXt", b"parameters\0\0not zlib"))) is None
    assert read_parameters(tiny_png(chunk(b"iTXt", b"parameters\0\1"))) is None
    assert read_parameters(b"GIF89a" + good[8:]) is None
    assert read_parameters(b"") is None


def test_chunks_besides_the_pixels_are_counted_up_to_a_limit() -> None:
    from bot.png_parameters import MAX_PNG_CHUNKS, too_many_chunks

    empty = chunk(b"prVt", b"")
    # IHDR and the 8x8 image's one small IDAT count as well: MAX_PNG_CHUNKS in all, then one more.
    assert not too_many_chunks(tiny_png(empty * (MAX_PNG_CHUNKS - 10), after_pixels=empty * 8))
    assert too_many_chunks(tiny_png(empty * (MAX_PNG_CHUNKS - 9), after_pixels=empty * 8))
    assert too_many_chunks(tiny_png(after_pixels=empty * MAX_PNG_CHUNKS))
    assert too_many_chunks(tiny_png(chunk(b"IDAT", b"") * MAX_PNG_CHUNKS))  # empty pixel data
    # Large pixel data chunks are not counted: their number is bounded by the file's size.
    big_data = tiny_png(after_pixels=chunk(b"fdAT", bytes(1024)) * (MAX_PNG_CHUNKS + 1))
    assert not too_many_chunks(big_data)
    assert not too_many_chunks(b"GIF89a" + empty * (MAX_PNG_CHUNKS + 1))  # not a PNG
    data = tiny_png(empty * 1_000_000)
    result, seconds = timed(lambda: too_many_chunks(data))
    assert result is True and seconds < FAST
