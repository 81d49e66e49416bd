"""The API's aiohttp application and the server that runs it inside the bot's process.

`ApiServer(ctx).start(bind)` serves on `host:port` (SDBOT_API_BIND; port 0 picks a free one)
and returns its URL; `close()` cancels the jobs its clients wait for and stops serving. The
runner opens it after the backend and closes it before the backend.

Bodies are capped (`client_max_size`) at what two base64 pictures at the attachment limit
need, so no request makes the process hold more than that.
"""

from __future__ import annotations

import logging

from aiohttp import web

from bot.http_api import generation, listing
from bot.http_api.context import CONTEXT, ApiContext
from bot.http_api.problems import errors_as_json
from bot.inputs import attachment_bytes
from bot.settings import is_loopback, parse_bind

log = logging.getLogger(__name__)

API = "/sdapi/v1"


def body_limit(ctx: ApiContext) -> int:
    """Bytes a request body may have: an image and a mask at the attachment cap, in base64,
    and a margin for the JSON around them."""
    return attachment_bytes(ctx.settings.max_attachment_mb) * 8 // 3 + 1024 * 1024


def make_app(ctx: ApiContext) -> web.Application:
    app = web.Application(client_max_size=body_limit(ctx), middlewares=[errors_as_json])
    app[CONTEXT] = ctx
    app.router.add_post(f"{API}/txt2img", generation.txt2img)
    app.router.add_post(f"{API}/img2img", generation.img2img)
    app.router.add_get(f"{API}/progress", generation.progress)
    app.router.add_post(f"{API}/interrupt", generation.interrupt)
    app.router.add_get(f"{API}/sd-models", listing.sd_models)
    app.router.add_get(f"{API}/samplers", listing.samplers)
    app.router.add_get(f"{API}/schedulers", listing.schedulers)
    app.router.add_get(f"{API}/loras", listing.loras)
    app.router.add_get(f"{API}/options", listing.get_options)
    app.router.add_post(f"{API}/options", listing.set_options)
    app.router.add_post(f"{API}/png-info", listing.png_info)
    app.router.add_get(f"{API}/embeddings", listing.embeddings)
    for name in ("sd-vae", "upscalers", "hypernetworks", "prompt-styles"):
        app.router.add_get(f"{API}/{name}", listing.empty_list)
    for name in ("refresh-checkpoints", "refresh-loras"):
        app.router.add_post(f"{API}/{name}", listing.nothing)
    return app


class ApiServer:
    """One API server; start once, close once."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, bind: str) -> str:
        host, port = parse_bind(bind)
        if not is_loopback(host):
            # Configured on purpose (SDBOT_API_BIND is explicit), but say what it means.
            log.warning(
                "the HTTP API listens on %s, beyond this machine: API keys travel in clear text "
                "unless a TLS proxy stands in front of it", host,
            )  # fmt: skip
        # handler_cancellation: a request whose client hung up stops waiting, and its job is
        # cancelled (generation.py), rather than running for no one.
        runner = web.AppRunner(
            make_app(self.ctx), access_log=None, shutdown_timeout=5, handler_cancellation=True
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot serve the HTTP API on {bind}: {exc.strerror or exc}") from exc
        self._runner = runner
        bound = runner.addresses[0]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound[1]}"
        return self.url

    async def close(self) -> None:
        """Cancel what API clients wait for (their requests then answer), then stop."""
        for tracked in self.ctx.tracker.all():
            await self.ctx.backend.cancel(tracked.job.id)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
