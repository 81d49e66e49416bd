"""Input pictures end to end: fetched from Discord's hosts only, kept so that buttons rerun a
job after its attachment URL is gone, pruned with their last row; and the owner's per-member
queue limit, which servers may lower but not raise."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from bench.harness import Harness, running_bot
from bot.discord_front.intake import download
from bot.discord_front.services import Services
from bot.engine import Engine
from bot.errors import InvalidRequest
from bot.localdiscord.client import ControlClient
from bot.localdiscord.records import Attachment
from bot.settings import Settings
from tests import images
from tests.test_e2e_discord import buttons


def rows(h: Harness, table: str = "jobs") -> list[dict[str, Any]]:
    with sqlite3.connect(h.settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]


async def answer(c: ControlClient, sent: dict[str, Any], *, user_id: int | None = None) -> Any:
    """The first thing the member sees for an interaction: its result, or an ephemeral
    refusal (so a test fails at once on a refusal instead of waiting for a result)."""
    interaction_id = sent["interaction"]["id"]
    return await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == interaction_id
            and (bool(m["flags"] & 64) or ("seed `" in m["content"] and bool(m["attachments"])))
        ),
        viewer=user_id or await c.member_id(),
        timeout=90,
    )


def result(msg: dict[str, Any]) -> dict[str, Any]:
    assert msg["attachments"], f"refused instead: {msg['content']}"
    return msg


async def pixels(c: ControlClient, msg: dict[str, Any]) -> bytes:
    return Image.open(io.BytesIO(await c.download(msg["attachments"][0]))).tobytes()


def kept_file(h: Harness, data: bytes) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return h.settings.db_path.parent / "inputs" / sha[:2] / sha


# -- attachment URLs: Discord's hosts only -------------------------------------------------------


class Bait:
    """An HTTP server on another port of this machine, counting the requests that reach it."""

    def __init__(self) -> None:
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def serve(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(body=images.photo((64, 64)), content_type="image/png")

        app = web.Application()
        app.router.add_get("/{tail:.*}", serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/attachments/1/cat.png"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def bait() -> AsyncIterator[Bait]:
    server = Bait()
    await server.start()
    yield server
    await server.close()


@dataclasses.dataclass
class ForgedAttachment(Attachment):
    """An attachment whose payload names another URL: what a forged interaction carries."""

    forged_url: str = ""

    def payload(self, base_url: str) -> dict[str, Any]:
        out = super().payload(base_url)
        out["url"] = out["proxy_url"] = self.forged_url
        return out


async def test_a_forged_attachment_url_is_refused_before_any_request(
    harness: Harness, bait: Bait
) -> None:
    # The control API uploads to the server's own origin only: the forgery is planted in the
    # in-process server's state (there is no control endpoint for it).
    c = harness.control
    data = images.photo((64, 64))
    att = await c.upload(data, "cat.png")
    world = harness.server.world
    world.attachments[int(att["id"])] = ForgedAttachment(
        int(att["id"]), "cat.png", "image/png", data, forged_url=bait.url
    )
    sent = await c.slash("img2img", {"image": att["id"], "prompt": "x", "steps": 2})
    reply = await answer(c, sent)
    assert "not a Discord attachment" in reply["content"] and not reply["attachments"]
    assert bait.hits == 0
    [row] = rows(harness)
    assert row["status"] == "rejected" and "not a Discord attachment" in row["error"]


async def test_attachments_on_the_configured_servers_origin_are_fetched(harness: Harness) -> None:
    data = images.photo((64, 64))
    att = await harness.control.upload(data, "cat.png")
    assert await download(harness.bot.services, att["url"]) == data


class RecordingSession:
    """Stands in for the bot's aiohttp session: records every URL it is asked to fetch."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    @contextlib.asynccontextmanager
    async def get(self, url: Any, **_: Any) -> AsyncIterator[Any]:
        self.requested.append(str(url))
        body = images.photo((32, 32))

        async def chunks(_: int) -> AsyncIterator[bytes]:
            yield body

        content = SimpleNamespace(iter_chunked=chunks)
        yield SimpleNamespace(status=200, content_length=len(body), content=content)


def fake_services(settings: Settings, api_base: str | None) -> tuple[Services, RecordingSession]:
    session = RecordingSession()
    local = settings.model_copy(update={"discord_api_base": api_base})
    return cast(Services, SimpleNamespace(settings=local, http=session)), session


REFUSED = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:9/attachments/1/cat.png",  # this machine, another port than the API's
    "http://127.0.0.1:8765.evil.example/cat.png",
    "http://cdn.discordapp.com/attachments/1/2/cat.png",  # not https
    "https://cdn.discordapp.com:8443/attachments/1/2/cat.png",
    "https://user:pw@cdn.discordapp.com/attachments/1/2/cat.png",
    "https://cdn.discordapp.com.evil.example/attachments/1/2/cat.png",
    "https://evil.example/?next=https://cdn.discordapp.com/a.png",
    "https://discord.com/api/v10/users/@me",
    "file:///etc/passwd",
    "/attachments/1/cat.png",
    "https://cdn.discordapp.com\\@evil.example/cat.png",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_download_refuses_other_hosts_without_a_request(settings: Settings, url: str) -> None:
    svc, session = fake_services(settings, "http://127.0.0.1:8765")
    with pytest.raises(InvalidRequest, match="not a Discord attachment"):
        await download(svc, url)
    assert session.requested == []


@pytest.mark.parametrize(
    ("url", "api_base"),
    [
        ("https://cdn.discordapp.com/attachments/1/2/cat.png?ex=1&is=2&hm=3", None),
        ("https://media.discordapp.net/attachments/1/2/cat.png", None),
        ("https://CDN.discordapp.com:443/attachments/1/2/cat.png", "http://127.0.0.1:8765"),
        ("http://127.0.0.1:8765/attachments/1/cat.png", "http://127.0.0.1:8765"),
        ("https://discord.example/attachments/1/cat.png", "https://discord.example"),
    ],
)
async def test_download_fetches_from_discords_hosts(
    settings: Settings, url: str, api_base: str | None
) -> None:
    svc, session = fake_services(settings, api_base)
    assert await download(svc, url) == images.photo((32, 32))
    assert len(session.requested) == 1


# -- kept input pictures -------------------------------------------------------------------------


def forget(h: Harness, *attachments: dict[str, Any]) -> None:
    """Make attachment URLs dead, as Discord's signed ones are after a day."""
    for att in attachments:
        h.server.world.attachments.pop(int(att["id"]))


async def is_dead(url: str) -> bool:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status == 404


async def test_buttons_rerun_from_the_kept_picture_once_the_url_is_dead(harness: Harness) -> None:
    c = harness.control
    data = images.photo((96, 64))
    att = await c.upload(data, "photo.png")
    sent = await c.slash(
        "img2img", {"image": att["id"], "prompt": "make it night", "steps": 2, "seed": 42}
    )
    first = result(await answer(c, sent))
    assert kept_file(harness, data).read_bytes() == data
    forget(harness, att)
    assert await is_dead(att["url"])

    # Edit prompt keeps the seed: the same prompt must give the very same pixels.
    click = await c.click(first["id"], buttons(first)["Edit prompt"])
    field = click["interaction"]["modal"]["components"][0]["components"][0]
    sent = await c.submit_modal(click["interaction"]["id"], {field["custom_id"]: "make it night"})
    same = result(await answer(c, sent))
    assert await pixels(c, same) == await pixels(c, first)

    reroll = result(await answer(c, await c.click(first["id"], buttons(first)["Reroll"])))
    assert (await download_size(c, reroll)) == (96, 64)
    result(await answer(c, await c.click(first["id"], buttons(first)["V1"])))

    assert [(r["command"], r["status"]) for r in rows(harness)] == [
        ("img2img", "finished"),
        ("edit", "finished"),
        ("reroll", "finished"),
        ("vary", "finished"),
    ]
    sha = hashlib.sha256(data).hexdigest()
    db = harness.bot.services.db
    assert [await db.inputs_of(job_id) for job_id in (1, 2, 3)] == [{"image": sha}] * 3


async def download_size(c: ControlClient, msg: dict[str, Any]) -> tuple[int, int]:
    return Image.open(io.BytesIO(await c.download(msg["attachments"][0]))).size


async def test_an_inpaint_reroll_reads_the_kept_picture_and_mask(harness: Harness) -> None:
    c = harness.control
    photo, mask = images.photo((64, 64)), images.mask((64, 64))
    photo_att = await c.upload(photo, "p.png")
    mask_att = await c.upload(mask, "m.png")
    sent = await c.slash(
        "inpaint", {"image": photo_att["id"], "mask": mask_att["id"], "prompt": "sky", "steps": 2}
    )
    first = result(await answer(c, sent))
    forget(harness, photo_att, mask_att)
    result(await answer(c, await c.click(first["id"], buttons(first)["Reroll"])))
    expected = {
        "image": hashlib.sha256(photo).hexdigest(),
        "mask": hashlib.sha256(mask).hexdigest(),
    }
    db = harness.bot.services.db
    assert [await db.inputs_of(job_id) for job_id in (1, 2)] == [expected] * 2


async def test_a_refused_request_keeps_no_picture(harness: Harness) -> None:
    c = harness.control
    admin = await c.admin_id()
    sent = await c.slash("config set", {"key": "max_size", "value": "64"}, user_id=admin)
    await answer(c, sent, user_id=admin)
    data = images.photo((192, 128))  # repainted at 96x64: wider than the server allows
    att = await c.upload(data, "wide.png")
    sent = await c.slash("img2img", {"image": att["id"], "prompt": "x", "steps": 2})
    assert "larger than this server allows" in (await answer(c, sent))["content"]
    assert not kept_file(harness, data).exists()
    assert rows(harness, "job_inputs") == []


async def test_retention_deletes_a_kept_picture_with_the_last_row_using_it(
    settings: Settings, engine: Engine
) -> None:
    data = images.photo((64, 64))
    async with running_bot(settings, engine=engine) as h:
        c = h.control
        att = await c.upload(data, "photo.png")
        sent = await c.slash("img2img", {"image": att["id"], "prompt": "x", "steps": 2})
        result(await answer(c, sent))
        path = kept_file(h, data)
        assert path.exists()
    with sqlite3.connect(settings.db_path) as conn:
        conn.execute("UPDATE jobs SET queued_at='2000-01-01T00:00:00.000Z'")
    # Retention runs at start-up.
    async with running_bot(settings.model_copy(update={"retention_days": 30}), engine=engine):
        pass
    with sqlite3.connect(settings.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM job_inputs").fetchone() == (0,)
    assert not path.exists()


# -- the owner's per-member queue limit ---------------------------------------------------------


@pytest.fixture
async def capped(settings: Settings, engine: Engine) -> AsyncIterator[Harness]:
    """A bot whose owner set SDBOT_USER_QUEUE_LIMIT=2."""
    async with running_bot(settings.model_copy(update={"user_queue_limit": 2}), engine=engine) as h:
        yield h


async def block_the_queue(h: Harness) -> None:
    """A long job of the admin's runs, so the member's jobs wait behind it."""
    c = h.control
    sent = await c.slash(
        "imagine",
        {"prompt": "blocker", "steps": 150, "size": "256x256"},
        user_id=await c.admin_id(),
    )
    original = sent["interaction"]["original_message_id"]
    await c.wait_for_message(
        lambda m: m["id"] == original and "step" in m["content"],
        viewer=await c.admin_id(),
        timeout=60,
    )


async def cancel_everything(h: Harness) -> None:
    backend = h.bot.services.backend
    for row in rows(h):
        if row["status"] in ("queued", "running"):
            await backend.cancel(row["id"])


async def quick_job(c: ControlClient) -> dict[str, Any]:
    return await c.slash("imagine", {"prompt": "wait", "steps": 1})


async def test_the_owners_queue_limit_is_the_default_and_servers_may_lower_it(
    capped: Harness,
) -> None:
    c = capped.control
    admin = await c.admin_id()
    try:
        await block_the_queue(capped)
        for _ in range(2):
            assert (await quick_job(c))["interaction"]["callback_type"] == 5  # deferred: queued
        refused = await answer(c, await quick_job(c))
        assert "the limit is 2" in refused["content"]

        sent = await c.slash("config set", {"key": "user_queue_cap", "value": "1"}, user_id=admin)
        assert "is now **1**" in (await answer(c, sent, user_id=admin))["content"]
        refused = await answer(c, await quick_job(c))
        assert "the limit is 1" in refused["content"]
    finally:
        await cancel_everything(capped)


async def test_config_refuses_a_queue_cap_above_the_owners_limit(capped: Harness) -> None:
    c = capped.control
    admin = await c.admin_id()
    sent = await c.slash("config set", {"key": "user_queue_cap", "value": "3"}, user_id=admin)
    reply = await answer(c, sent, user_id=admin)
    assert "2 is the most this bot's owner allows" in reply["content"]
    assert "SDBOT_USER_QUEUE_LIMIT" in reply["content"]
    sent = await c.slash("config show", user_id=admin)
    assert "`user_queue_cap` = **2**" in (await answer(c, sent, user_id=admin))["content"]
