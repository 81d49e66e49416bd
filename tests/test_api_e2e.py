"""The AUTOMATIC1111-compatible API end to end: the real bot (tiny model, SQLite) serving the
API and the local Discord server at once, a real HTTP client, keys made with /apikey."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image, ImageOps

from bench.harness import Harness, free_port, running_bot
from bot.engine import Engine
from bot.imaging import parse_parameters, read_parameters
from bot.jobs import GenerationRequest
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.settings import Settings
from tests.test_e2e_admin import admin, imagine, refused, reply_to, rows


@dataclass
class Api:
    """The running bot, and an HTTP client on its API."""

    harness: Harness
    http: aiohttp.ClientSession

    @property
    def control(self) -> ControlClient:
        return self.harness.control

    async def call(
        self, method: str, path: str, key: str | None = None, body: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(
            method, f"/sdapi/v1/{path}", json=body, headers=headers, **kw
        ) as resp:
            text = await resp.text()
            assert "Traceback" not in text and 'File "' not in text
            return resp.status, json.loads(text) if text else None

    async def new_key(self, user_id: int | None = None, name: str = "") -> str:
        """A key made with /apikey create, as the member reads it in the ephemeral reply."""
        user = user_id or await self.control.member_id()
        sent = await self.control.slash(
            "apikey create", {"name": name} if name else {}, user_id=user
        )
        msg = await reply_to(self.control, sent, user)
        assert msg["flags"] & 64, "the key must be shown ephemerally"
        found = re.search(r"```\n(sdbot-[A-Za-z0-9_-]{43})\n```", msg["content"])
        assert found, msg["content"]
        return found.group(1)


def api_settings(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={"api_bind": f"127.0.0.1:{free_port()}", **extra})


@contextlib.asynccontextmanager
async def running_api(
    settings: Settings, engine: Engine, *, server: LocalDiscord | None = None
) -> AsyncIterator[Api]:
    async with running_bot(settings, engine=engine, server=server) as harness:
        base = f"http://{settings.api_bind}"
        async with aiohttp.ClientSession(base_url=base) as http:
            yield Api(harness, http)


@pytest.fixture
async def api(settings: Settings, engine: Engine) -> AsyncIterator[Api]:
    async with running_api(api_settings(settings, preview_every=1), engine) as running:
        yield running


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(images: list[str]) -> list[bytes]:
    return [base64.b64decode(i) for i in images]


async def test_apikey_create_list_revoke_and_basic_or_bearer_auth(api: Api) -> None:
    c = api.control
    member = await c.member_id()
    key = await api.new_key(name="krita")
    # Stored hashed: the key itself is nowhere in the database.
    with sqlite3.connect(api.harness.settings.db_path) as conn:
        dump = "\n".join(conn.iterdump())
    assert key not in dump and key[:12] in dump

    sent = await c.slash("apikey list", {}, user_id=member)
    listed = (await reply_to(c, sent, member))["content"]
    assert key[:12] in listed and "krita" in listed and key not in listed

    # Basic auth with any user name (what A1111 clients send), and Bearer.
    async with api.http.get("/sdapi/v1/sd-models", auth=aiohttp.BasicAuth("me", key)) as resp:
        assert resp.status == 200 and "tiny" in [m["model_name"] for m in await resp.json()]
    assert (await api.call("GET", "samplers", key))[0] == 200

    sent = await c.slash("apikey revoke", {"key": "krita"}, user_id=member)
    assert "Revoked" in (await reply_to(c, sent, member))["content"]
    status, body = await api.call("GET", "sd-models", key)
    assert status == 401 and "API key" in body["detail"]


async def test_no_key_a_wrong_key_or_a_malformed_header_is_401(api: Api) -> None:
    key = await api.new_key()
    for headers in (
        {},
        {"Authorization": "Bearer sdbot-" + "x" * 43},
        {"Authorization": f"Bearer {key}x"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(key.encode()).decode()},  # no colon
        {"Authorization": f"Token {key}"},
    ):
        async with api.http.get("/sdapi/v1/options", headers=headers) as resp:
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
            assert "API key" in (await resp.json())["detail"]
    async with api.http.post("/sdapi/v1/txt2img", json={"prompt": "x"}) as resp:
        assert resp.status == 401
    assert rows(api.harness) == []  # nobody to record a refusal for


async def test_txt2img_answers_like_a1111_and_records_an_api_job(api: Api) -> None:
    key = await api.new_key()
    body = {
        "prompt": "a red fox", "negative_prompt": "blurry", "seed": 1234, "steps": 2,
        "cfg_scale": 6.5, "width": 100, "height": 64, "sampler_name": "DPM++ 2M",
        "scheduler": "Karras", "batch_size": 2, "n_iter": 1, "restore_faces": False,
        "send_images": True, "alwayson_scripts": {}, "subseed": -1,
    }  # fmt: skip
    status, out = await api.call("POST", "txt2img", key, body)
    assert status == 200, out
    pngs = decoded(out["images"])
    assert len(pngs) == 2
    for png, seed in zip(pngs, (1234, 1235), strict=True):
        assert Image.open(io.BytesIO(png)).size == (96, 64)  # snapped to 8, as on Discord
        found = parse_parameters(read_parameters(png) or "")
        assert found["Seed"] == str(seed) and found["Sampler"] == "DPM++ 2M Karras"
        assert found["prompt"] == "a red fox" and found["CFG scale"] == "6.5"
    info = json.loads(out["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["cfg_scale"] == 6.5
    assert info["infotexts"][0] == read_parameters(pngs[0])
    assert out["parameters"]["prompt"] == "a red fox" and out["parameters"]["batch_size"] == 2
    [row] = rows(api.harness)
    assert row["command"] == "api:txt2img" and row["status"] == "finished"
    assert row["channel_id"] is None, "the images went over HTTP: nothing to post in Discord"
    assert row["user_id"] == await api.control.member_id() and row["count"] == 2
    assert json.loads(row["params"])["api_key"] == key[:12]


async def test_img2img_and_inpaint_with_a_mask(api: Api, engine: Engine) -> None:
    key = await api.new_key()
    picture = Image.new("RGB", (96, 64), (200, 30, 30))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))  # white = repaint: the left half
    base = {"prompt": "a cat", "steps": 4, "seed": 7, "denoising_strength": 0.5}
    status, out = await api.call(
        "POST",
        "img2img",
        key,
        {**base, "init_images": ["data:image/png;base64," + b64png(picture)]},
    )
    assert status == 200, out
    [png] = decoded(out["images"])
    assert Image.open(io.BytesIO(png)).size == (96, 64)  # the picture's aspect at native size
    assert parse_parameters(read_parameters(png) or "")["Denoising strength"] == "0.5"

    results = []
    for invert in (0, 1):
        status, out = await api.call(
            "POST", "img2img", key,
            {**base, "init_images": [b64png(picture)], "mask": b64png(mask),
             "inpainting_mask_invert": invert, "denoising_strength": 1.0},
        )  # fmt: skip
        assert status == 200, out
        got = Image.open(io.BytesIO(decoded(out["images"])[0])).convert("RGB")
        # What the engine makes with that mask (white = repaint), or its inverse.
        wanted = engine.generate(
            [
                GenerationRequest(
                    prompt="a cat", model="tiny", width=96, height=64, steps=4, seed=7,
                    mode="inpaint", strength=1.0, init_image=picture,
                    mask_image=ImageOps.invert(mask) if invert else mask,
                )
            ]
        )[0].images[0]  # fmt: skip
        assert np.array_equal(np.asarray(got), np.asarray(wanted.convert("RGB")))
        results.append(np.asarray(got))
    assert not np.array_equal(results[0], results[1]), (
        "inverting the mask must change what is repainted"
    )
    assert [r["command"] for r in rows(api.harness)] == [
        "api:img2img",
        "api:inpaint",
        "api:inpaint",
    ]


async def test_listings_options_and_png_info(api: Api) -> None:
    key = await api.new_key()
    _, models = await api.call("GET", "sd-models", key)
    assert {"tiny", "tiny-xl"} <= {m["title"] for m in models}
    _, samplers = await api.call("GET", "samplers", key)
    assert "Euler a" in [s["name"] for s in samplers]
    _, schedulers = await api.call("GET", "schedulers", key)
    assert [s["label"] for s in schedulers] == ["Automatic", "Karras"]
    assert (await api.call("GET", "loras", key)) == (200, [])

    # The checkpoint is kept per key: another key of the same member keeps the default.
    other = await api.new_key()
    assert (await api.call("GET", "options", key))[1]["sd_model_checkpoint"] == "tiny"
    chosen = {"sd_model_checkpoint": "tiny-turbo [abc]", "CLIP_stop_at_last_layers": 2}
    assert (await api.call("POST", "options", key, chosen))[0] == 200
    assert (await api.call("GET", "options", key))[1]["sd_model_checkpoint"] == "tiny-turbo"
    assert (await api.call("GET", "options", other))[1]["sd_model_checkpoint"] == "tiny"
    status, body = await api.call("POST", "options", key, {"sd_model_checkpoint": "nope"})
    assert status == 422 and "nope" in body["detail"]
    status, out = await api.call("POST", "txt2img", key, {"prompt": "a hill"})
    ran = json.loads(out["info"])
    assert status == 200 and ran["sd_model_name"] == "tiny-turbo"
    # The model's own defaults (models.toml), as on Discord: a turbo model's 2 steps, no CFG.
    assert (ran["steps"], ran["cfg_scale"]) == (2, 0.0)

    status, found = await api.call("POST", "png-info", key, {"image": out["images"][0]})
    assert status == 200 and found["parameters"]["Model"] == "tiny-turbo"
    assert found["info"] == json.loads(out["info"])["infotexts"][0]
    plain = b64png(Image.new("RGB", (8, 8)))
    assert (await api.call("POST", "png-info", key, {"image": plain}))[1]["info"] == ""


BAD_BODIES = [
    pytest.param({"prompt": "x", "steps": 0}, "steps 0 is out of range", id="steps-zero"),
    pytest.param({"prompt": "x", "steps": "many"}, "steps must be a whole number", id="steps-text"),
    pytest.param({"prompt": ""}, "The prompt is empty", id="no-prompt"),
    pytest.param({"prompt": "x", "batch_size": 4, "n_iter": 2}, "at most 4", id="too-many"),
    pytest.param({"prompt": "x", "width": 4096}, "width 4096 is out of range", id="huge"),
    pytest.param({"prompt": "x", "sampler_name": "Magic"}, "Unknown scheduler", id="sampler"),
    pytest.param({"prompt": "x" * 1001}, "1001 characters", id="long-prompt"),
    pytest.param([1, 2], "must be a JSON object", id="not-an-object"),
    pytest.param(
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "../etc"}},
        "Unknown model", id="model",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "detail"), BAD_BODIES)
async def test_bad_bodies_are_422_naming_what_is_wrong_and_recorded(
    api: Api, body: Any, detail: str
) -> None:
    key = await api.new_key()
    status, out = await api.call("POST", "txt2img", key, body)
    assert status == 422 and detail in out["detail"], out
    [row] = rows(api.harness)
    assert row["status"] == "rejected" and row["command"] == "api:txt2img"


async def test_bad_pictures_and_bodies_are_refused_without_a_traceback(api: Api) -> None:
    key = await api.new_key()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with api.http.post("/sdapi/v1/txt2img", data=b"{not json", headers=headers) as resp:
        assert resp.status == 422 and "not valid JSON" in (await resp.json())["detail"]
    # A PNG that claims 30000x30000 pixels is refused from its header.
    bomb = Image.new("1", (30000, 30000))
    buf = io.BytesIO()
    bomb.save(buf, format="PNG")
    base = {"prompt": "x", "steps": 2}
    cases = [
        ({**base, "init_images": [base64.b64encode(buf.getvalue()).decode()]}, "pixels"),
        ({**base, "init_images": ["%%%notbase64"]}, "image"),
        ({**base, "init_images": []}, "init_images must be a list"),
        ({**base, "init_images": [b64png(Image.new("RGB", (64, 64)))], "mask": "AAAA"}, "mask"),
    ]
    for body, detail in cases:
        status, out = await api.call("POST", "img2img", key, body)
        assert status == 422 and detail in out["detail"], (detail, out)
    # Past the body cap: 413, as JSON.
    big = {
        "prompt": "x",
        "init_images": ["A" * int(api.harness.settings.max_attachment_mb * 3 * 2**20)],
    }
    status, out = await api.call("POST", "img2img", key, big)
    assert status == 413 and "too large" in out["detail"]
    assert (await api.call("GET", "nowhere", key))[0] == 404
    assert {r["status"] for r in rows(api.harness)} == {"rejected"}


async def test_the_servers_rules_apply_to_the_keys_owner(api: Api) -> None:
    c = api.control
    member = await c.member_id()
    key = await api.new_key()
    await admin(c, "config blocklist add", {"pattern": "dragon"})
    status, out = await api.call("POST", "txt2img", key, {"prompt": "a red dragon"})
    assert status == 422 and "blocks" in out["detail"]

    # The daily quota counts Discord and API images together.
    await admin(c, "config set", {"key": "daily_quota", "value": "4"})
    assert not refused(await imagine(c, user_id=member))
    two = {"prompt": "a", "steps": 1, "batch_size": 2}
    assert (await api.call("POST", "txt2img", key, two))[0] == 200
    status, out = await api.call("POST", "txt2img", key, two)
    assert status == 429 and "daily quota of 4 images (1 left)" in out["detail"]
    await admin(c, "config set", {"key": "max_size", "value": "64"})
    status, out = await api.call("POST", "txt2img", key, {"prompt": "c", "width": 128})
    assert status == 422 and "larger than this server allows" in out["detail"]

    await admin(c, "config ban", {"user": member, "reason": "spam"})
    status, out = await api.call("POST", "txt2img", key, {"prompt": "a fox", "steps": 1})
    assert status == 403 and "spam" in out["detail"]
    await admin(c, "config unban", {"user": member})

    await admin(c, "config set", {"key": "api_enabled", "value": "false"})
    for method, path in (("GET", "sd-models"), ("POST", "txt2img")):
        status, out = await api.call(method, path, key, {"prompt": "a fox"})
        assert status == 403 and "turned sdbot's API off" in out["detail"]
    sent = await c.slash("apikey create", {}, user_id=member)
    assert "turned sdbot's API off" in (await reply_to(c, sent, member))["content"]

    reasons = [(r["command"], r["status"], r["reason"]) for r in rows(api.harness)]
    assert reasons == [
        ("api:txt2img", "rejected", "blocked_word"),
        ("imagine", "finished", None),
        ("api:txt2img", "finished", None),
        ("api:txt2img", "rejected", "quota"),
        ("api:txt2img", "rejected", "limit"),
        ("api:txt2img", "rejected", "banned"),
        ("api:txt2img", "rejected", "api_disabled"),
    ]


async def test_progress_while_a_job_runs_and_interrupt_stops_only_that_keys_job(
    api: Api,
) -> None:
    c = api.control
    key = await api.new_key()
    other_member = await c.add_user("other")
    other = await api.new_key(other_member)
    status, idle = await api.call("GET", "progress", key)
    assert status == 200 and idle["progress"] == 0 and idle["state"]["job_count"] == 0

    long = {"prompt": "a long one", "steps": 150, "width": 64, "height": 64, "seed": 1}
    mine = asyncio.create_task(api.call("POST", "txt2img", key, long))
    theirs = asyncio.create_task(api.call("POST", "txt2img", other, {**long, "steps": 40}))
    seen: dict[str, Any] = {}
    for _ in range(600):
        status, seen = await api.call("GET", "progress", key)
        if seen["state"]["sampling_step"] > 2 and seen["current_image"]:
            break
        await asyncio.sleep(0.02)
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150
    assert seen["eta_relative"] > 0 and seen["textinfo"].startswith("Step ")
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.format == "PNG"
    skipped = (await api.call("GET", "progress?skip_current_image=true", key))[1]
    assert skipped["current_image"] is None

    status, out = await api.call("POST", "interrupt", key)
    assert status == 200
    status, out = await mine
    assert status == 200 and out["images"] == [] and json.loads(out["info"])["interrupted"]
    status, out = await theirs  # the other key's job ran on
    assert status == 200 and len(out["images"]) == 1
    statuses = {r["user_id"]: r["status"] for r in rows(api.harness)}
    assert statuses == {await c.member_id(): "cancelled", other_member: "finished"}


async def test_a_client_that_hangs_up_has_its_job_cancelled(api: Api) -> None:
    key = await api.new_key()
    long = {"prompt": "a long one", "steps": 150, "width": 64, "height": 64}
    with pytest.raises(TimeoutError):
        await api.call("POST", "txt2img", key, long, timeout=aiohttp.ClientTimeout(total=0.5))
    for _ in range(200):
        if [r["status"] for r in rows(api.harness)] == ["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert [r["status"] for r in rows(api.harness)] == ["cancelled"]
