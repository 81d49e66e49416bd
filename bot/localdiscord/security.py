"""Who may drive the local server. The control API plays every member, can make admins, reads
ephemeral messages and hands out interaction tokens (so it can post as the bot): whoever reaches
it owns the playground. Each request therefore passes these checks before any handler runs:

- Host must be the loopback host:port the server is bound to. A web page can point its own DNS
  name at 127.0.0.1 (DNS rebinding) and become same-origin with us; its Host header still names
  the attacker's domain, so this refuses it.
- Origin, when a browser sends one, must be the server's own: no other web page may call us.
- Control routes need the per-run token (`Authorization: Bearer <token>`). A cross-site page
  cannot set that header without a CORS preflight we never grant, and cannot read the token.
- State-changing control requests must be JSON (uploads: raw image bytes), content types an
  HTML form cannot send; so even a leaked token is not enough for a drive-by form post.

The playground page and its script load without the token (it arrives in the URL fragment,
which browsers never send to the server). The Discord side keeps Discord's own rules: the REST
routes check the bot token (server.py), the gateway checks it in IDENTIFY, attachment URLs are
public like Discord's CDN.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from aiohttp import web

from bot.localdiscord.records import ApiError
from bot.localdiscord.wire import API

CONTROL_PREFIX = "/_control"
#: The one control route that takes raw bytes (an image) instead of JSON.
UPLOAD_PATH = CONTROL_PREFIX + "/attachments"
#: Served without the control token: the page, its script, and the Discord side (REST checks
#: the bot token itself, the gateway in IDENTIFY; attachments are public like Discord's CDN).
PUBLIC_PATHS = frozenset({"/", "/playground.js", "/gateway"})
PUBLIC_PREFIXES = (API + "/", "/attachments/")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class RemoteBindRefused(ValueError):
    """The server was asked to listen beyond this machine without saying so explicitly."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name (or "" = every interface) may resolve anywhere


def url_host(host: str) -> str:
    """`host` as it appears in a URL or a Host header (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_bind(host: str, *, allow_remote: bool) -> None:
    if allow_remote or is_loopback(host):
        return
    raise RemoteBindRefused(
        f"Refusing to serve the local Discord server and its playground on {host or '*'!r}: "
        "anyone who reaches it can act as any member and post as the bot. Bind a loopback "
        "address (127.0.0.1, localhost, ::1), or allow it explicitly with allow_remote=True "
        "(`sdbot playground`: SDBOT_PLAYGROUND_ALLOW_REMOTE=true) on a network you trust."
    )


def _forbidden(message: str) -> ApiError:
    return ApiError(403, message, 0)


class ControlGuard:
    """The checks above, for one server run. `bind` tells it the address once it is known."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(32)
        #: Host headers we answer to; None when remote access was allowed (any host name).
        self.allowed_hosts: frozenset[str] | None = frozenset()

    def bind(self, host: str, port: int, *, allow_remote: bool) -> None:
        check_bind(host, allow_remote=allow_remote)
        if allow_remote:
            self.allowed_hosts = None
            return
        names = {*LOOPBACK_NAMES, url_host(host).lower()}
        hosts = {f"{name}:{port}" for name in names}
        if port == 80:  # browsers leave the default port out of Host and Origin
            hosts |= names
        self.allowed_hosts = frozenset(hosts)

    def check(self, request: web.Request) -> None:
        """Raise the ApiError a request gets refused with; return if it may go on."""
        host = request.headers.get("Host", "").lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            raise _forbidden(f"Host {host!r} is not this server (DNS rebinding protection)")
        origin = request.headers.get("Origin")
        if origin is not None and not self._own_origin(origin.lower(), host):
            raise _forbidden(f"Cross-origin request from {origin!r} refused")
        path = request.path
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return
        if not self._token_ok(request.headers.get("Authorization", "")):
            raise ApiError(
                401,
                "The control API needs the playground token: open the URL the server printed "
                "(it ends in #token=...), or send `Authorization: Bearer <token>`",
                0,
                headers={"WWW-Authenticate": 'Bearer realm="sdbot playground"'},
            )
        if request.method not in _SAFE_METHODS:
            self._check_content_type(request)

    def _own_origin(self, origin: str, host: str) -> bool:
        if self.allowed_hosts is None:
            return origin in (f"http://{host}", f"https://{host}")
        return origin.startswith("http://") and origin[len("http://") :] in self.allowed_hosts

    def _token_ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    @staticmethod
    def _check_content_type(request: web.Request) -> None:
        # The raw header, not request.content_type: aiohttp reports a missing header as
        # application/octet-stream, and a missing one is what a no-cors fetch can send.
        raw = request.headers.get("Content-Type")
        mime = (raw or "").split(";", 1)[0].strip().lower()
        if request.path == UPLOAD_PATH:
            if mime == "application/octet-stream" or mime.startswith("image/"):
                return
            wanted = "an image type or application/octet-stream"
        elif mime == "application/json":
            return
        else:
            wanted = "application/json"
        raise ApiError(415, f"Content-Type must be {wanted}, not {raw!r}", 0)
