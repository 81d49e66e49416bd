"""`sdbot playground` serves the API too, with a key for its member, and prints a curl line
that works: run as a real subprocess, the printed line followed as a person would."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shlex
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp

from bench.harness import free_port
from bot.png_parameters import read_parameters
from tests.test_playground import ROOT, _drain


async def test_the_playground_prints_a_working_curl_line_for_its_member(
    tmp_path: Path, model_cache: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDBOT_", "DISCORD_"))}
    env.update(
        PYTHONPATH=str(ROOT), SDBOT_PLAYGROUND_PORT="0", SDBOT_CACHE_DIR=str(model_cache),
        SDBOT_DB_PATH=str(tmp_path / "play.db"), SDBOT_DEVICE="cpu",
        SDBOT_API_BIND=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "playground", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    output: list[str] = []
    try:
        curl = None
        while curl is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "playground exited early:\n" + "".join(output)
            output.append(line)
            if line.strip().startswith("curl "):
                curl = shlex.split(line.strip())
        drain = asyncio.create_task(_drain(proc.stdout, output))
        user, _, key = curl[curl.index("-u") + 1].partition(":")
        body = curl[curl.index("-d") + 1]
        url = curl[-1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/sdapi/v1/txt2img", url)
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=body) as anonymous:
                assert anonymous.status == 401
            headers = {"Content-Type": "application/json"}
            auth = aiohttp.BasicAuth(user, key)
            async with session.post(url, data=body, headers=headers, auth=auth) as resp:
                assert resp.status == 200, await resp.text()
                png = base64.b64decode((await resp.json())["images"][0])
        assert "a red fox in snow" in (read_parameters(png) or "")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(output)
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with sqlite3.connect(tmp_path / "play.db") as conn:
        assert conn.execute("SELECT command, status FROM jobs").fetchall() == [
            ("api:txt2img", "finished")
        ]
    assert "Traceback" not in "".join(output)
