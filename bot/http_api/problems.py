"""Errors as AUTOMATIC1111's API answers them: JSON with a `detail` that says what is wrong,
and a status a client can act on. The one middleware here turns every failure into such an
answer: a domain error's message (written for the person who caused it), aiohttp's own errors
(404, 405, 413) as JSON, and anything unexpected as a plain 500 with a reference to the log.
No traceback ever leaves the process."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from bot.errors import SdbotError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unauthorized(SdbotError):
    """No key, a wrong one or a revoked one: one answer for all, so keys cannot be probed."""

    reason = "unauthorized"

    def __init__(self) -> None:
        super().__init__(
            "Unauthorized: send an sdbot API key (/apikey create in Discord) as the password of "
            "HTTP Basic auth or as `Authorization: Bearer KEY`."
        )


#: Status per refusal reason; any other domain error is the request's fault (422).
STATUS_BY_REASON = {
    "unauthorized": 401,
    "api_disabled": 403,
    "banned": 403,
    "channel": 403,
    "dm": 403,
    "permission": 403,
    "cooldown": 429,
    "quota": 429,
    "queue_full": 429,
    "user_queue_full": 429,
    "cancelled": 503,
    "model_load": 503,
    "generation": 500,
    "out_of_memory": 500,
}

_errors = itertools.count(1)


def status_for(error: SdbotError) -> int:
    return STATUS_BY_REASON.get(error.reason, 422)


def problem(status: int, detail: str, *, error: str = "") -> web.Response:
    """A1111's error body: {"error": kind, "detail": message}."""
    body = {"error": error or _reason_phrase(status), "detail": detail}
    response = web.json_response(body, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="sdbot", charset="UTF-8"'
    return response


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SdbotError as exc:
        status = status_for(exc)
        log.info(
            "API %s %s refused (%d %s): %s", request.method, request.path, status, exc.reason,
            exc.message,
        )  # fmt: skip
        return problem(status, exc.message, error=type(exc).__name__)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith("<") else exc.reason
        if exc.status == 413:
            detail = "The request is too large for this server (images are capped in size)."
        return problem(exc.status, detail.removeprefix(f"{exc.status}: "))
    except Exception:
        ref = next(_errors)
        log.exception("API %s %s failed (error ref %d)", request.method, request.path, ref)
        return problem(500, f"Internal error (ref {ref}); the bot's log has the details.")
