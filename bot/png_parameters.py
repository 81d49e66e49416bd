"""Reading AUTOMATIC1111 `parameters` text back out of members' PNGs (`/pnginfo`, the context
menus), bounded and in linear time: an upload is untrusted, and a PNG text chunk may hold
megabytes. Writing it is `bot.imaging.format_parameters`. The same chunk walker counts a PNG's
chunks before Pillow decodes it (`too_many_chunks`).

The chunks are read here rather than by Pillow, so only the one text chunk wanted is inflated,
and only up to MAX_PARAMETERS_BYTES, whatever Pillow's global text limits are.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterator

from bot.errors import InvalidRequest

#: The most of a PNG's `parameters` text sdbot reads. Its own and A1111's are a few KB (sdbot's
#: prompts are 1000 characters at most); a text chunk may hold megabytes.
MAX_PARAMETERS_BYTES = 16 * 1024
#: Chunks walked before giving up: an upload of a million empty chunks costs no more.
_MAX_PNG_CHUNKS = 4096
#: Chunks besides its pixel data a PNG may have for sdbot to decode it. Pillow walks chunks one
#: by one (~4 µs each) before, between and after the pixel data: a million empty ones, 12 MB,
#: cost seconds of CPU. Real PNGs have a few dozen.
MAX_PNG_CHUNKS = 4096
#: Pixel data chunks (IDAT, APNG's fdAT) at least this long are not counted: their number is
#: bounded by the file size, and a real encoder writes them 8 KB or more at a time.
_COUNTED_DATA_BELOW = 1024
_DATA_CHUNKS = (b"IDAT", b"fdAT")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_KEYWORD = b"parameters\0"


def read_parameters(data: bytes) -> str | None:
    """The `parameters` text of a PNG made by us, A1111 or any tool that follows it.

    Reads the PNG's text chunks itself (tEXt, zTXt, iTXt; the first named `parameters`) and
    inflates a compressed one only up to MAX_PARAMETERS_BYTES, so no upload costs more than
    milliseconds. None when `data` is no PNG or has no such chunk; InvalidRequest when the
    text is longer than MAX_PARAMETERS_BYTES.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(data)
    for kind, start, end in itertools.islice(_chunks(data), _MAX_PNG_CHUNKS):
        if (
            kind in (b"tEXt", b"zTXt", b"iTXt")
            and data.startswith(_KEYWORD, start, end)
            # A chunk that fails its checksum is damaged: as good as absent.
            and zlib.crc32(view[start - 4 : end]) == struct.unpack_from(">I", data, end)[0]
        ):
            return _chunk_text(kind, data[start + len(_KEYWORD) : end])
    return None


def parameters_in(data: bytes) -> dict[str, str]:
    """The generation parameters a PNG carries, parsed; {} for any other file, a broken one,
    or one cut short before its `parameters` chunk (a prefix read to pre-fill a form).
    CPU work on member-supplied bytes: run it in a thread, never on the event loop."""
    if not data.startswith(PNG_SIGNATURE):
        return {}
    try:
        text = read_parameters(data)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        return {}  # the ways a broken PNG fails to read: it carries nothing readable
    return parse_parameters(text) if text else {}


def too_many_chunks(data: bytes) -> bool:
    """Whether `data` is a PNG with more than MAX_PNG_CHUNKS chunks besides its pixel data,
    too many for Pillow to walk in good time. Stops counting there, so it takes at most a
    few milliseconds (plus one step per large pixel data chunk); False for any other format."""
    if not data.startswith(PNG_SIGNATURE):
        return False
    counted = 0
    for kind, start, end in _chunks(data):
        if kind in _DATA_CHUNKS and end - start >= _COUNTED_DATA_BELOW:
            continue
        counted += 1
        if counted > MAX_PNG_CHUNKS:
            return True
    return False


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end of its data) of each whole chunk of a PNG, up to IEND or the first
    chunk cut off (Pillow stops at IEND too). The CRC is the 4 bytes at `end`."""
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if kind == b"IEND" or end + 4 > len(data):
            return
        yield kind, pos + 8, end
        pos = end + 4


def _chunk_text(kind: bytes, body: bytes) -> str | None:
    """The text of a tEXt/zTXt/iTXt chunk after its keyword (layouts from the PNG spec)."""
    compressed, encoding = kind == b"zTXt", "latin-1"
    if compressed:
        method, body = body[:1], body[1:]
        if method != b"\0":
            return None
    elif kind == b"iTXt":
        # flag, method, language NUL, translated keyword NUL, UTF-8 text
        parts = body[2:].split(b"\0", 2)
        if len(body) < 2 or len(parts) < 3 or (body[0] and body[1]):  # zlib is method 0
            return None
        compressed, encoding, body = body[0] != 0, "utf-8", parts[2]
    if compressed:
        try:
            # Inflate one byte past the limit and no further: a 1 MB bomb stops there.
            body = zlib.decompressobj().decompress(body, MAX_PARAMETERS_BYTES + 1)
        except zlib.error:
            return None
    if len(body) > MAX_PARAMETERS_BYTES:
        raise _too_long()
    return body.decode(encoding, "replace")


def _too_long() -> InvalidRequest:
    return InvalidRequest(
        f"The image's generation parameters are longer than {MAX_PARAMETERS_BYTES // 1024} KB, "
        "more than sdbot reads (sdbot and AUTOMATIC1111 write a few KB)."
    )


def parse_parameters(text: str) -> dict[str, str]:
    """Split A1111 `parameters` text into prompt, negative prompt and the key/value fields.

    Linear in the length of the text, which comes from members' uploads; InvalidRequest when
    it is longer than MAX_PARAMETERS_BYTES characters.
    """
    if len(text) > MAX_PARAMETERS_BYTES:
        raise _too_long()
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    fields_line = lines[-1] if len(lines) > 1 or "Steps:" in lines[-1] else ""
    body = lines[:-1] if fields_line else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in body:
        if line.startswith("Negative prompt:") or negative_lines:
            negative_lines.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt_lines.append(line)
    result["prompt"] = "\n".join(prompt_lines)
    result["negative_prompt"] = "\n".join(negative_lines)
    result.update(_fields(fields_line))
    return result


def _fields(line: str) -> Iterator[tuple[str, str]]:
    """The `key: value` pairs of A1111's last line, exactly as the findall of A1111's pattern
    `\\s*([\\w ]+):\\s*("(?:\\\\.|[^"])*"|[^,]*)(?:,|$)` gives them, in linear time (the
    pattern itself takes quadratic time on a long key-less line, and exponential time on
    backslashes after a quote).

    A key is the letters, digits, `_` and spaces before a colon. A value runs to the next
    comma, unless it starts with a quote that can close, followed by a comma or the end.
    """
    closing = _quote_closings(line) if '"' in line else []
    pos, size = 0, len(line)
    while (colon := line.find(":", pos)) >= 0:
        start = colon
        while start > pos and (line[start - 1] == " " or _is_word(line[start - 1])):
            start -= 1
        if start == colon:  # no key before this colon (`a-:`); the pattern moves past it
            pos = colon + 1
            continue
        value = colon + 1
        while value < size and line[value].isspace():
            value += 1
        close = closing[value + 1] if value < size and line[value] == '"' else -1
        end = close + 1 if close >= 0 else _find(line, ",", value)
        yield line[start:colon].strip(), line[value:end].strip()
        pos = end + 1  # past the comma (or the end)


def _quote_closings(line: str) -> list[int]:
    """For each position i inside a quoted value, where the pattern's `(?:\\\\.|[^"])*"` from
    i closes it (a quote followed by a comma or the end), or -1: the pattern's backtracking
    search, tried in its own order (a backslash first escapes the next character, then is
    itself), done once from the right."""
    size = len(line)
    closing = [-1] * (size + 2)
    for i in range(size - 1, -1, -1):
        char = line[i]
        if char == '"':
            closing[i] = i if i + 1 == size or line[i + 1] == "," else -1
        elif char == "\\" and i + 1 < size and closing[i + 2] >= 0:
            closing[i] = closing[i + 2]
        else:
            closing[i] = closing[i + 1]
    return closing


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"  # the pattern's \w, as re defines it


def _find(text: str, char: str, start: int) -> int:
    found = text.find(char, start)
    return len(text) if found < 0 else found
