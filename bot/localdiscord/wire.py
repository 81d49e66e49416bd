"""How the local Discord-compatible server writes HTTP: the REST prefix, JSON responses exactly
as discord.py expects them, and the content-type sniffing Discord does on uploads.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

API = "/api/v10"


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # Exactly "application/json", no charset: discord.py compares the header verbatim.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def guess_type(filename: str | None, data: bytes) -> str:
    head = data[:12]
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    name = (filename or "").lower()
    for ext, ctype in (
        (".png", "image/png"),
        (".jpg", "image/jpeg"),
        (".jpeg", "image/jpeg"),
        (".webp", "image/webp"),
        (".gif", "image/gif"),
    ):
        if name.endswith(ext):
            return ctype
    return "application/octet-stream"
