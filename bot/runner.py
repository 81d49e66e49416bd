"""Entry points owning the shared resources: database, engine, executor, HTTP session, bot,
local server. The composition root: the one place the Discord front meets the executor."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import discord

from bot import outputs
from bot.catalog import Catalog
from bot.db import Database
from bot.discord_front.app import SdBot, configure_api_base
from bot.discord_front.services import Services
from bot.errors import SdbotError, SettingsError
from bot.executor import GpuExecutor, Worker
from bot.guild_config import GuildConfigs
from bot.http_api.context import ApiContext
from bot.http_api.progress import JobTracker
from bot.http_api.server import ApiServer
from bot.settings import Settings, check_default_model, is_loopback_url, parse_bind

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.localdiscord.server import LocalDiscord

#: Where the playground serves the HTTP API when SDBOT_API_BIND is unset and it is free.
PLAYGROUND_API_PORT = 7860

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def bot_resources(
    settings: Settings,
    *,
    sync: bool = False,
    engine: Engine | None = None,
    preload: bool | asyncio.Event = True,
    **bot_options: Any,
) -> AsyncIterator[SdBot]:
    """Open everything the bot needs, in order, and close it in reverse even on errors.

    preload: load the default model in the background, so that the first member does not wait
        for it: True = at once, an Event = once it is set, False = not until a job needs it.
    """
    catalog = Catalog.load(settings.models_file, settings.lora_dir)
    check_default_model(settings, catalog)
    # sdbot has no voice: discord.py's warnings about the voice libraries are noise.
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    async with contextlib.AsyncExitStack() as stack:
        db = await Database.open(settings.db_path)
        stack.push_async_callback(db.close)
        stale = await _tidy(db, settings)
        limits: dict[str, Any] = {
            "queue_limit": settings.queue_limit,
            "user_queue_limit": settings.user_queue_limit,
            "max_batch": settings.max_batch,
            "preview_every": settings.preview_every,
        }
        executor: GpuExecutor[Any]
        if engine is None and settings.backend == "serve":
            # Ray takes seconds to import and is an optional extra: only for this backend.
            try:
                from bot.serve.cluster import serve_engines
            except ImportError as exc:
                raise SettingsError(
                    f"SDBOT_BACKEND=serve needs Ray Serve ({exc}); install it with "
                    "pip install -e '.[serve]'."
                ) from None

            # One worker per replica slot, so the queue hands each replica its own batch; the
            # cluster (or what this process started of it) goes after the executor.
            remote = await stack.enter_async_context(serve_engines(settings))
            workers = [Worker(e, name=f"sdbot-serve-{i}") for i, e in enumerate(remote)]
            executor = GpuExecutor(db=db, workers=workers, **limits)
        else:
            executor = GpuExecutor(engine or _make_engine(settings, catalog), db, **limits)
        # Model loads happen on the GPU thread; the recorder carries them to SQLite.
        executor.engine.on_load = executor.load_recorder()
        await executor.start()
        stack.push_async_callback(executor.close)
        if preload is not False:
            gate = preload if isinstance(preload, asyncio.Event) else None
            task = asyncio.create_task(_preload(executor, settings.default_model.strip(), gate))
            # Runs before executor.close(), which does not wait long for a load in progress.
            stack.push_async_callback(_cancel, task)
        # For downloading attachments and earlier results; bounded so a slow CDN cannot wedge
        # a job. Closed after the bot, which the caller closes first.
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )
        services = Services(
            settings=settings,
            db=db,
            backend=executor,
            catalog=catalog,
            guild_configs=GuildConfigs(db, user_queue_limit=settings.user_queue_limit),
            http=http,
        )
        if settings.api_bind:
            # After the backend on the stack, so closed before it: its clients' jobs are
            # cancelled while the backend can still answer them.
            await _serve_api(stack, services, settings.api_bind)
        bot = SdBot(services, sync=sync, interrupted=stale, **bot_options)
        # torch, diffusers and discord.py leave ~350k long-lived objects behind at import; every
        # full collection would walk them all on the event loop (0.2-0.8 s stalls, measured by
        # `sdbot bench load --blame`). Freezing moves them out of the collector's way.
        gc.collect()
        gc.freeze()
        yield bot


async def _serve_api(stack: contextlib.AsyncExitStack, services: Services, bind: str) -> str:
    """Start the AUTOMATIC1111-compatible API on `bind`, on the same backend and rules as the
    Discord front; closed by `stack`. Its URL."""
    ctx = ApiContext(
        settings=services.settings,
        db=services.db,
        backend=services.backend,
        catalog=services.catalog,
        guild_configs=services.guild_configs,
        tracker=JobTracker(),
    )
    server = ApiServer(ctx)
    try:
        url = await server.start(bind)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"SDBOT_API_BIND: {exc}") from None
    stack.push_async_callback(server.close)
    log.info("AUTOMATIC1111-compatible API at %s/sdapi/v1 (members make keys with /apikey)", url)
    return url


async def _preload(executor: GpuExecutor[Any], model: str, gate: asyncio.Event | None) -> None:
    """Load `model` on every worker, saying so in the log; a failure is one warning line and
    the bot carries on (the model loads again, or fails for the member, at first use)."""
    if gate is not None:
        await gate.wait()
    log.info("loading default model %s…", model)
    started = time.perf_counter()
    try:
        await executor.preload(model)
    except Exception as exc:
        # The whole message: an engine's load error says what to do about it.
        why = exc.message if isinstance(exc, SdbotError) else _describe(exc)
        log.warning("could not preload default model %s; the bot runs on: %s", model, why)
        return
    log.info("model %s ready in %.1f s", model, time.perf_counter() - started)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _tidy(db: Database, settings: Settings) -> list[Any]:
    """Close out what a previous run left: its unfinished jobs (returned, so their owners can
    be told) and, past the retention period, old rows and images."""
    stale = await db.interrupt_unfinished()
    if stale:
        log.warning("%d job(s) from a previous run were marked interrupted", len(stale))
    if settings.retention_days:
        cutoff = datetime.now(UTC) - timedelta(days=settings.retention_days)
        stamp = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        pruned, files = await db.prune(stamp)
        deleted = await asyncio.to_thread(outputs.remove, files)
        log.info("retention: pruned %d job row(s) and %d image(s)", pruned, deleted)
    return list(stale)


def _make_engine(settings: Settings, catalog: Catalog) -> Engine:
    from bot.engine import Engine  # torch/diffusers take seconds to import: only when serving

    return Engine.from_settings(settings, catalog)


def _close_on_signals(bot: SdBot) -> None:
    """SIGTERM/SIGINT close the bot; the context managers then interrupt queued jobs cleanly."""
    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []  # keep a reference so the task is not collected

    def close() -> None:
        log.info("signal received; shutting down")
        closing.append(loop.create_task(bot.close()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, close)


async def run_bot(settings: Settings, *, sync: bool = False) -> None:
    token = settings.token
    assert token, "run_bot needs DISCORD_TOKEN"
    await configure_api_base(settings.discord_api_base)
    if settings.discord_api_base and is_loopback_url(settings.discord_api_base):
        quiet_loopback_heartbeat()
    # After the login: a wrong token must not start a download that the exit then waits for.
    logged_in = asyncio.Event()
    async with bot_resources(settings, sync=sync, preload=logged_in) as bot, bot:
        _close_on_signals(bot)
        await login(bot, token, where=settings.discord_api_base or "discord.com")
        logged_in.set()
        await bot.connect()


async def login(bot: SdBot, token: str, *, where: str) -> None:
    """`bot.login`, with a refused token or an unreachable server as one SettingsError line.

    After login discord.py reconnects by itself; before it, nothing works, so stop and say why.
    """
    try:
        await bot.login(token)
    except discord.LoginFailure:
        raise SettingsError(
            f"{where} refused DISCORD_TOKEN (401 Unauthorized): copy the bot's token again from "
            "https://discord.com/developers/applications (Bot -> Reset Token) into .env."
        ) from None
    except (aiohttp.ClientConnectionError, TimeoutError, discord.DiscordServerError) as exc:
        raise SettingsError(
            f"cannot reach Discord at {where} ({_describe(exc)}); check this machine's network"
            " and DISCORD_API_BASE."
        ) from None
    except discord.HTTPException as exc:
        if bot.user is not None:  # logged in, so setup_hook failed: a bug, keep its traceback
            raise
        raise SettingsError(
            f"{where} answered the login with HTTP {exc.status}; is DISCORD_API_BASE a "
            "Discord-compatible server?"
        ) from None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class _LoopbackHeartbeatRace(logging.Filter):
    """Drops discord.py's "Can't keep up, ... websocket is 41.3s behind" on a loopback server.

    discord.py's heartbeat thread sends a beat through the event loop and only then notes the
    send time; a server on this machine acks so fast that the loop handles the ack first, so
    the latency is measured from the previous beat: one heartbeat interval. The network to
    this machine cannot be behind, and a blocked loop still shows as "Heartbeat blocked".
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Can't keep up")


def quiet_loopback_heartbeat() -> None:
    """Install _LoopbackHeartbeatRace once; only for a server on this machine."""
    gateway_log = logging.getLogger("discord.gateway")
    if not any(isinstance(f, _LoopbackHeartbeatRace) for f in gateway_log.filters):
        gateway_log.addFilter(_LoopbackHeartbeatRace())


async def run_playground(settings: Settings) -> None:
    """Local server + bot + tiny model in one process: everything without a Discord account."""
    from bot.localdiscord.server import LocalDiscord  # only the playground serves it

    server = LocalDiscord()
    try:
        url = await server.start(
            settings.playground_host,
            settings.playground_port,
            allow_remote=settings.playground_allow_remote,
        )
    except ValueError as exc:  # a non-loopback bind nobody asked for
        raise SettingsError(str(exc)) from None
    try:
        # The playground's own server: its gateway may be on a LAN address when asked to be.
        await configure_api_base(url, real_token=False)
        quiet_loopback_heartbeat()
        # The API too, unless the owner turned it on somewhere already.
        api_bind = settings.api_bind or _playground_api_bind()
        local = settings.model_copy(update={"discord_api_base": url, "api_bind": api_bind})
        async with bot_resources(local, sync=True) as bot, bot:
            _close_on_signals(bot)
            print(
                f"sdbot playground: open {server.playground_url} in a browser (Ctrl-C to stop)",
                flush=True,
            )
            print(await _playground_api_demo(bot, server, api_bind), flush=True)
            await bot.start(server.bot_token)
    finally:
        await server.close()


def _playground_api_bind() -> str:
    """127.0.0.1:7860 (A1111's port) when it is free, else any free port on this machine."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", PLAYGROUND_API_PORT))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def _playground_api_demo(bot: SdBot, server: LocalDiscord, api_bind: str) -> str:
    """A key for the playground's member, and how to call the API with it.

    Only hashes are stored, so the last start's key cannot be shown again: it is revoked and
    a new one made, so restarts never pile up keys past the per-member cap."""
    world = server.world
    db = bot.services.db
    await db.revoke_member_api_keys(world.guild_id, world.member.id, name="playground")
    key, _ = await db.create_api_key(
        guild_id=world.guild_id,
        user_id=world.member.id,
        user_name=world.member.username,
        channel_id=world.default_channel_id,
        name="playground",
    )
    host, port = parse_bind(api_bind)
    body = '{"prompt": "a red fox in snow", "steps": 4}'
    return (
        f"sdbot playground: A1111 API at http://{host}:{port} for the member, key {key}\n"
        f"  curl -s -u demo:{key} -H 'Content-Type: application/json' -d '{body}' "
        f"http://{host}:{port}/sdapi/v1/txt2img"
    )
