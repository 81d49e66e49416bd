"""`sdbot playground`, the main job without a token, as a real subprocess driven over HTTP."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp

from bot.localdiscord.client import ControlClient
from tests.playground_process import playground_process


async def test_the_playground_serves_imagine_and_shuts_down_cleanly(
    tmp_path: Path, model_cache: Path
) -> None:
    # No subcommand and no token: the main job falls back to the playground. The printed
    # address carries the control token in its fragment: /#token=...
    async with playground_process(
        tmp_path, model_cache, wait_for=r"open (http://\S+) in a browser"
    ) as printed:
        url = printed.group(1)
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
    with sqlite3.connect(tmp_path / "play.db") as conn:
        assert conn.execute("SELECT status, seed FROM jobs").fetchall() == [("finished", 7)]
