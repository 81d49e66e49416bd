"""The real bot, in this process, connected to a fresh local Discord server: for tests and bench.

By default the server shares the bot's event loop (simple, and tests may reach into
`harness.server`). With `server_process=True` it runs in a child process, as Discord runs
elsewhere: the load bench uses that, so the work of playing Discord and its members is not
counted as the bot's event-loop lag, on the loop or for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import aiohttp

from bot.discord_front.app import SdBot, configure_api_base
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.runner import bot_resources
from bot.settings import Settings

if TYPE_CHECKING:
    from bot.engine import Engine

T = TypeVar("T")
P = ParamSpec("P")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the bot's HTTP API: SDBOT_API_BIND)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A LocalDiscord in a child process, serving from that process's own event loop.

    Unlike a thread it shares neither the bot's loop nor its GIL, as the real Discord does
    not: only then is the lag measured on the bot's loop the bot's own. Work that needs the
    server's state runs there through `call`, one call at a time.
    """

    def __init__(self, *, upload_limit: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
        self._conn, self._child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve, args=(self._child_conn, upload_limit), name="local-discord", daemon=True
        )
        self._lock = asyncio.Lock()
        self.base_url = self.bot_token = self.control_token = ""

    async def start(self) -> str:
        self._process.start()
        # Only the child holds its end now, so a child that dies reads as EOF here, not a hang.
        self._child_conn.close()
        self.base_url, self.bot_token, self.control_token = await self._receive()
        return self.base_url

    async def call(
        self,
        fn: Callable[Concatenate[LocalDiscord, P], Awaitable[T]],
        /,
        *a: P.args,
        **kw: P.kwargs,
    ) -> T:
        """`await fn(server, *a, **kw)` in the child: `fn` must be importable by name (a
        module-level function), and its arguments and result picklable."""
        async with self._lock:
            self._conn.send((fn, a, kw))
            return await self._receive()  # type: ignore[no-any-return]

    async def _receive(self) -> Any:
        try:
            ok, value = await asyncio.to_thread(self._conn.recv)
        except EOFError:
            await asyncio.to_thread(self._process.join, 5)
            code = self._process.exitcode
            raise RuntimeError(f"the local Discord server's process ended (exit {code})") from None
        if not ok:
            raise RuntimeError(f"in the local Discord server's process:\n{value}")
        return value

    async def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            await asyncio.to_thread(self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def _serve(conn: Connection, upload_limit: int | None) -> None:
    """The child process: serve, and run the parent's calls until it sends None."""

    async def main() -> None:
        server = LocalDiscord(upload_limit=upload_limit)
        await server.start()
        conn.send((True, (server.base_url, server.bot_token, server.control_token)))
        try:
            while (request := await asyncio.to_thread(conn.recv)) is not None:
                fn, args, kwargs = request
                try:
                    reply = (True, await fn(server, *args, **kwargs))
                except Exception:
                    reply = (False, traceback.format_exc())
                conn.send(reply)
        finally:
            await server.close()

    asyncio.run(main())


@dataclass
class Harness:
    bot: SdBot
    control: ControlClient
    settings: Settings
    local_server: LocalDiscord | None = None
    #: Set instead of local_server when the server runs in its own process.
    process: ServerProcess | None = None

    @property
    def server(self) -> LocalDiscord:
        """The server on this loop, for tests that reach into it."""
        if self.local_server is None:
            raise RuntimeError("the server runs in another process: use harness.process")
        return self.local_server


@contextlib.asynccontextmanager
async def running_bot(
    settings: Settings,
    *,
    engine: Engine | None = None,
    upload_limit: int | None = None,
    server: LocalDiscord | None = None,
    server_process: bool = False,
    **bot_options: Any,
) -> AsyncIterator[Harness]:
    """A bot connected to `server` (a new one unless given: pass one to simulate a restart).

    With server_process, a new server runs in a child process instead (`harness.process`).
    """
    if server is not None and server_process:
        raise ValueError("server_process starts its own server; do not pass one as well")
    process: ServerProcess | None = None
    own_server = server is None
    if server_process:
        process = ServerProcess(upload_limit=upload_limit)
    elif server is None:
        server = LocalDiscord(upload_limit=upload_limit)
    try:
        if process is not None:
            url = await process.start()
            bot_token, control_token = process.bot_token, process.control_token
        else:
            assert server is not None
            url = server.base_url if not own_server else await server.start()
            bot_token, control_token = server.bot_token, server.control_token
        await configure_api_base(url)
        settings = settings.model_copy(update={"discord_api_base": url})
        # Discord holds READY back 2 s for late guilds; the local server sends them at once.
        bot_options.setdefault("guild_ready_timeout", 0.05)
        async with bot_resources(settings, sync=True, engine=engine, **bot_options) as bot, bot:
            task = asyncio.create_task(bot.start(bot_token))
            try:
                ready = asyncio.create_task(bot.wait_until_ready())
                done, _ = await asyncio.wait(
                    {ready, task}, timeout=30, return_when="FIRST_COMPLETED"
                )
                if task in done:
                    ready.cancel()
                    task.result()  # login or gateway failure: raise it here, not a timeout
                if ready not in done:
                    raise TimeoutError("the bot did not become ready within 30 s")
                async with aiohttp.ClientSession() as session:
                    control = ControlClient(url, session, token=control_token)
                    yield Harness(bot, control, settings, server, process)
            finally:
                await bot.close()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        if process is not None:
            await process.close()
        elif own_server and server is not None:
            await server.close()
