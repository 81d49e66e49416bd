"""`sdbot playground` serves the API too, with a key for its member, and prints a curl line
that works: run as a real subprocess, the printed line followed as a person would."""

from __future__ import annotations

import base64
import re
import shlex
import sqlite3
from pathlib import Path

import aiohttp

from bench.harness import free_port
from bot.png_parameters import read_parameters
from tests.playground_process import playground_process


async def test_the_playground_prints_a_working_curl_line_for_its_member(
    tmp_path: Path, model_cache: Path
) -> None:
    async with playground_process(
        tmp_path,
        model_cache,
        "playground",
        wait_for=r"^\s*curl .*",
        env={"SDBOT_API_BIND": f"127.0.0.1:{free_port()}"},
    ) as printed:
        curl = shlex.split(printed.group(0).strip())
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
    with sqlite3.connect(tmp_path / "play.db") as conn:
        assert conn.execute("SELECT command, status FROM jobs").fetchall() == [
            ("api:txt2img", "finished")
        ]
