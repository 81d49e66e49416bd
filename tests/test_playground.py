"""`sdbot playground`, the main job without a token, as a real subprocess driven over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp

from bot.localdiscord.client import ControlClient

ROOT = Path(__file__).resolve().parents[1]


async def test_the_playground_serves_imagine_and_shuts_down_cleanly(
    tmp_path: Path, model_cache: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDBOT_", "DISCORD_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        SDBOT_PLAYGROUND_PORT="0",
        SDBOT_CACHE_DIR=str(model_cache),
        SDBOT_DB_PATH=str(tmp_path / "play.db"),
        SDBOT_DEVICE="cpu",
    )
    # No subcommand and no token: the main job falls back to the playground.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    output: list[str] = []
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "playground exited early:\n" + "".join(output)
            output.append(line)
            # The printed address carries the control token in its fragment: /#token=...
            if m := re.search(r"open (http://\S+) in a browser", line):
                url = m.group(1)
        drain = asyncio.create_task(_drain(proc.stdout, output))
        async with aiohttp.ClientSession() as session:
            page_url = url.partition("#")[0]
            page = await (await session.get(page_url)).text()
            assert "sdbot playground" in page
            async with session.get(page_url.rstrip("/") + "/_control/world") as anonymous:
                assert anonymous.status == 401, "the control API needs the printed token"
            control = ControlClient(url, session)
            for _ in range(200):
                if (await control.world(refresh=True))["bot_connected"]:
                    break
                await asyncio.sleep(0.05)
            sent = await control.slash(
                "imagine", {"prompt": "hello playground", "steps": 2, "seed": 7}
            )
            msg = await control.wait_for_message(lambda m: bool(m["attachments"]), timeout=120)
            assert "seed `7`" in msg["content"]
            assert sent["interaction"]["callback_type"] == 5
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(output)
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with sqlite3.connect(tmp_path / "play.db") as conn:
        assert conn.execute("SELECT status, seed FROM jobs").fetchall() == [("finished", 7)]
    assert "Traceback" not in "".join(output)


async def _drain(stream: asyncio.StreamReader, sink: list[str]) -> None:
    while line := await stream.readline():
        sink.append(line.decode())
