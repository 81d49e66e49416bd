"""Injected failures: the control API asks the local server to answer the next few matching
Discord REST requests with a 5xx or a 429, so tests see the bot retry through them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from bot.localdiscord.wire import json_response


@dataclass
class Fault:
    """Answer the next `count` requests matching `method` and `path` with `status`."""

    method: str
    path: re.Pattern[str]
    status: int
    count: int


def take_fault(faults: list[Fault], method: str, path: str) -> web.Response | None:
    """The injected answer for this request, if a fault with hits left matches it."""
    for fault in faults:
        if fault.count > 0 and fault.method == method and fault.path.search(path):
            fault.count -= 1
            if fault.status == 429:
                return json_response(
                    {
                        "message": "You are being rate limited.",
                        "retry_after": 0.05,
                        "global": False,
                    },
                    status=429,
                    headers={"Retry-After": "0.05", "X-RateLimit-Scope": "user"},
                )
            return json_response(
                {"message": "Internal Server Error", "code": 0}, status=fault.status
            )
    return None
