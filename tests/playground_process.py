"""`sdbot playground` as a real subprocess for the tests: started with a clean environment,
read until it prints the line a test follows, then stopped with SIGTERM as a person would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def playground_process(
    tmp_path: Path,
    model_cache: Path,
    *args: str,
    wait_for: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[re.Match[str]]:
    """Run `python -m bot *args` with the playground's settings (database in `tmp_path`) and
    yield the match of `wait_for` in the first line that has it. On leaving, the process must
    stop cleanly on SIGTERM (exit 0) and have printed no traceback."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SDBOT_", "DISCORD_"))}
    environ.update(
        PYTHONPATH=str(ROOT), SDBOT_PLAYGROUND_PORT="0", SDBOT_CACHE_DIR=str(model_cache),
        SDBOT_DB_PATH=str(tmp_path / "play.db"), SDBOT_DEVICE="cpu", **(env or {}),
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=tmp_path, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    output: list[str] = []
    try:
        match = None
        while match is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "playground exited early:\n" + "".join(output)
            output.append(line)
            match = re.search(wait_for, line)
        drain = asyncio.create_task(_drain(proc.stdout, output))
        yield match
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(output)
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in "".join(output)


async def _drain(stream: asyncio.StreamReader, sink: list[str]) -> None:
    while line := await stream.readline():
        sink.append(line.decode())
