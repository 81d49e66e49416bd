"""`sdbot run` as the owner starts it: failures to connect, or a bad setting, stop it with one
line and exit code 2, never a traceback; and what is not worth saying is not said."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
from pydantic import SecretStr

from bot import runner
from bot.cli import _setup_logging, main
from bot.errors import SettingsError
from bot.localdiscord.server import LocalDiscord
from bot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
WRONG_TOKEN = "MTIz.wrong-token-value"


@pytest.fixture
async def server() -> AsyncIterator[LocalDiscord]:
    local = LocalDiscord()
    await local.start("127.0.0.1", 0)
    try:
        yield local
    finally:
        await local.close()


async def sdbot(tmp_path: Path, args: list[str], **env: str) -> tuple[int, list[str]]:
    """`python -m bot ARGS` in a clean environment, while this loop serves the local server;
    its exit code and the lines of its stderr."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SDBOT_", "DISCORD_"))}
    full.update(PYTHONPATH=str(ROOT), SDBOT_DB_PATH=str(tmp_path / "sdbot.db"), **env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=tmp_path, env=full,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, err.decode().strip().splitlines()


def free_port() -> int:
    """A port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_wrong_token_is_one_line_and_exit_2(tmp_path: Path, server: LocalDiscord) -> None:
    code, err = await sdbot(
        tmp_path, ["run"], DISCORD_TOKEN=WRONG_TOKEN, DISCORD_API_BASE=server.base_url,
        SDBOT_LOG_LEVEL="WARNING",
    )  # fmt: skip
    assert code == 2
    assert err == [
        f"sdbot: {server.base_url} refused DISCORD_TOKEN (401 Unauthorized): copy the bot's "
        "token again from https://discord.com/developers/applications (Bot -> Reset Token) "
        "into .env."
    ]


async def test_at_the_default_log_level_too_no_traceback_and_no_voice_warnings(
    tmp_path: Path, server: LocalDiscord
) -> None:
    code, err = await sdbot(
        tmp_path, ["run"], DISCORD_TOKEN=WRONG_TOKEN, DISCORD_API_BASE=server.base_url
    )
    text = "\n".join(err)
    assert code == 2 and err[-1].startswith("sdbot: ") and "refused DISCORD_TOKEN" in err[-1]
    assert "Traceback" not in text and WRONG_TOKEN not in text
    # sdbot has no voice: discord.py's notes about its voice libraries are noise.
    assert "voice will NOT be supported" not in text
    assert all(" INFO " in line for line in err[:-1]), text  # start-up notes, nothing worse


async def test_a_server_nothing_listens_on_is_one_line_and_exit_2(tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    code, err = await sdbot(tmp_path, ["run"], DISCORD_TOKEN=WRONG_TOKEN, DISCORD_API_BASE=base)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"sdbot: DISCORD_API_BASE {base} did not answer")


async def test_a_bad_default_model_stops_start_up(tmp_path: Path, server: LocalDiscord) -> None:
    code, err = await sdbot(
        tmp_path, ["run"], DISCORD_TOKEN=server.bot_token, DISCORD_API_BASE=server.base_url,
        SDBOT_DEFAULT_MODEL="stable-diffusion-1.5", SDBOT_LOG_LEVEL="WARNING",
    )  # fmt: skip
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        "sdbot: invalid setting SDBOT_DEFAULT_MODEL: 'stable-diffusion-1.5' is not a model of "
        "the catalog (tiny, "
    )
    assert "a Hugging Face id `owner/name`" in err[0]
    assert not server.bot_connected


async def test_discord_unreachable_at_login_is_a_settings_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DISCORD_API_BASE: nothing is asked before the login, which is where an offline
    machine or a DNS failure shows (here: discord.com's address answered by a closed port)."""
    closed = f"http://127.0.0.1:{free_port()}/api/v10"

    async def discord_com_unreachable(base: str | None) -> None:
        assert base is None
        monkeypatch.setattr(discord.http.Route, "BASE", closed)

    monkeypatch.setattr(runner, "configure_api_base", discord_com_unreachable)
    with pytest.raises(SettingsError, match=r"^cannot reach Discord at discord\.com \("):
        await runner.run_bot(settings.model_copy(update={"discord_token": SecretStr(WRONG_TOKEN)}))


def test_the_loopback_heartbeat_race_is_quiet_and_a_blocked_loop_is_not() -> None:
    """Against a server on this machine discord.py measures its heartbeat latency from the
    previous beat (the ack beats the heartbeat thread's bookkeeping): 41.3 s "behind" on every
    beat. Dropped there; the warning that a blocked loop gives stays."""
    gateway = logging.getLogger("discord.gateway")
    saved = list(gateway.filters)  # an earlier in-process bot may have installed it
    before = [f for f in saved if type(f).__name__ != "_LoopbackHeartbeatRace"]
    gateway.filters[:] = before
    try:
        runner.quiet_loopback_heartbeat()
        runner.quiet_loopback_heartbeat()  # once is enough
        assert len(gateway.filters) == len(before) + 1

        def passes(msg: str, *args: object) -> bool:
            record = gateway.makeRecord(gateway.name, logging.WARNING, "", 0, msg, args, None)
            return bool(gateway.filter(record))

        assert not passes("Can't keep up, shard ID %s websocket is %.1fs behind.", None, 41.3)
        assert passes("Shard ID %s heartbeat blocked for more than %s seconds.", None, 10)
    finally:
        gateway.filters[:] = saved


def test_bench_help_lists_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sdbot bench")
    listed = [line.split()[0] for line in out.split("benchmarks:\n", 1)[1].splitlines()]
    assert listed == ["executor", "load", "serve", "gpu"]
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "gpus"])
    assert exit_.value.code == 2
    assert (
        "invalid choice: 'gpus' (choose from 'executor', 'load', 'serve', 'gpu')"
        in capsys.readouterr().err
    )


def test_transformers_notice_about_torchvision_is_not_shown(settings: Settings) -> None:
    """sdbot does not need torchvision; transformers says so whenever a pipeline loads."""
    notices = logging.getLogger("transformers.utils.import_utils")
    saved = list(notices.filters)  # an earlier in-process `main` may have installed it
    before = [f for f in saved if type(f).__name__ != "_NoTorchvisionNotice"]
    notices.filters[:] = before
    try:
        _setup_logging(settings)
        _setup_logging(settings)  # once is enough

        def passes(msg: str) -> bool:
            record = notices.makeRecord(notices.name, logging.WARNING, "", 0, msg, (), None)
            return bool(notices.filter(record))

        assert len(notices.filters) == len(before) + 1
        assert not passes(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        assert passes("Could not import module 'X'.")
    finally:
        notices.filters[:] = saved
