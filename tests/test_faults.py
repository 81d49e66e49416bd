"""Fault injection, end to end: a pipeline exception, GPU OOM, Discord answering 500/429, a
gateway disconnect mid-job, and kill -9 of the bot process during a job."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import Harness, running_bot
from bot.engine import Engine
from bot.errors import GpuOutOfMemory
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


class FaultyEngine:
    """The real engine, plus faults on cue: 'boom' in a prompt raises, 'oom' runs out of memory."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.on_load: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, requests: Any, **kwargs: Any) -> Any:
        prompts = " ".join(r.prompt for r in requests)
        if "boom" in prompts:
            raise RuntimeError("CUDA error: device-side assert triggered")
        if "oom" in prompts:
            raise GpuOutOfMemory("Ran out of GPU memory; try a smaller size.")
        return self._engine.generate(requests, **kwargs)


def statuses(db_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT prompt, status, reason FROM jobs ORDER BY id").fetchall()


async def result(c: ControlClient, prompt: str, timeout: float = 60) -> dict[str, Any]:
    return await c.wait_for_message(
        lambda m: "seed `" in m["content"] and prompt in m["content"] and bool(m["attachments"]),
        timeout=timeout,
    )


async def test_a_pipeline_exception_and_an_oom_fail_one_job_each(
    settings: Settings, engine: Engine
) -> None:
    async with running_bot(settings, engine=FaultyEngine(engine)) as h:  # type: ignore[arg-type]
        c = h.control
        for prompt in ("boom now", "oom now"):
            sent = await c.slash("imagine", {"prompt": prompt, "steps": 1})
            original = sent["interaction"]["original_message_id"]
            msg = await c.wait_for_message(
                lambda m, o=original: m["id"] == o and "❌" in m["content"]
            )
            assert "Traceback" not in msg["content"]
        await c.slash("imagine", {"prompt": "fine afterwards", "steps": 1})
        await result(c, "fine afterwards")
        rows = statuses(h.settings.db_path)
        assert rows[0][1] == "failed" and rows[1][1:] == ("failed", "out_of_memory")
        assert rows[2][1] == "finished"


async def test_discord_500_and_429_on_followups_and_edits_are_retried(harness: Harness) -> None:
    c = harness.control
    app = (await c.world())["application_id"]
    await c.add_fault("POST", rf"/webhooks/{app}/", 500, count=1)
    await c.add_fault("PATCH", rf"/webhooks/{app}/.*/messages/", 429, count=2)
    await c.add_fault("POST", rf"/webhooks/{app}/", 429, count=1)
    await c.slash("imagine", {"prompt": "resilient", "steps": 2})
    await result(c, "resilient", timeout=90)
    assert statuses(harness.settings.db_path) == [("resilient", "finished", None)]
    remaining = [f.count for f in harness.server.faults]
    assert remaining == [0, 0, 0], "every injected fault was hit and retried through"


async def test_a_gateway_disconnect_during_a_job_resumes(harness: Harness) -> None:
    c = harness.control
    db_path = harness.settings.db_path
    await c.slash("imagine", {"prompt": "through the storm", "steps": 60, "size": "192x192"})
    # Drop the connection only once the job runs, so the drop really is in the middle of it.
    for _ in range(600):
        if statuses(db_path) == [("through the storm", "running", None)]:
            break
        await asyncio.sleep(0.05)
    assert statuses(db_path) == [("through the storm", "running", None)]
    assert await c.disconnect_gateway() == 1
    assert statuses(db_path)[0][1] == "running", "the job was still running at the drop"
    await result(c, "through the storm", timeout=90)
    assert statuses(db_path) == [("through the storm", "finished", None)]
    # The same session resumed (no new IDENTIFY), and commands keep arriving over it.
    for _ in range(200):
        if harness.server.bot_connected:
            break
        await asyncio.sleep(0.05)
    assert len(harness.server.sessions) == 1
    await c.slash("imagine", {"prompt": "after resume", "steps": 1})
    await result(c, "after resume")


async def test_kill_9_during_a_job_then_restart_interrupts_and_tells_the_user(
    tmp_path: Path, model_cache: Path
) -> None:
    server = LocalDiscord()
    url = await server.start()
    db_path = tmp_path / "bot.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDBOT_", "DISCORD_"))}
    env.update(
        PYTHONPATH=str(ROOT), DISCORD_TOKEN=server.bot_token, DISCORD_API_BASE=url,
        SDBOT_DB_PATH=str(db_path), SDBOT_CACHE_DIR=str(model_cache), SDBOT_DEVICE="cpu",
    )  # fmt: skip

    async def start() -> asyncio.subprocess.Process:
        sessions = len(server.sessions)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(600):
            if server.bot_connected and len(server.sessions) > sessions:
                return proc
            await asyncio.sleep(0.05)
        raise TimeoutError("the bot did not connect")

    proc = await start()
    try:
        async with aiohttp.ClientSession() as session:
            c = ControlClient(url, session, token=server.control_token)
            await c.slash("imagine", {"prompt": "doomed", "steps": 150, "size": "256x256"})
            for _ in range(600):
                if statuses(db_path) == [("doomed", "running", None)]:
                    break
                await asyncio.sleep(0.05)
            assert statuses(db_path) == [("doomed", "running", None)]
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            proc = await start()
            notice = await c.wait_for_message(
                lambda m: "restarted before job #1" in m["content"], timeout=60
            )
            member = await c.member_id()
            assert f"<@{member}>" in notice["content"] and "doomed" in notice["content"]
            assert statuses(db_path) == [("doomed", "interrupted", "restart")]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        await server.close()
