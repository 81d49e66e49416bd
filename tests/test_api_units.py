"""The API's parts as plain data and real SQLite: keys (stored hashed, revoked at once, one
member's only), reading A1111 bodies, auth headers, the bind setting."""

from __future__ import annotations

import base64
import logging
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp.test_utils import make_mocked_request

from bot.db import MIGRATIONS, Database, hash_key
from bot.errors import InvalidRequest, SettingsError
from bot.http_api.auth import key_in
from bot.http_api.context import ApiContext
from bot.http_api.progress import JobTracker
from bot.http_api.schemas import model_name, parse_request, sampler_of
from bot.http_api.server import ApiServer
from bot.settings import is_loopback, load_settings, parse_bind


async def test_keys_are_stored_hashed_found_by_key_and_revoked_at_once(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "k.db") as db:
        key, row = await db.create_api_key(
            guild_id=1, user_id=2, user_name="amy", channel_id=3, name="krita"
        )
        assert key.startswith("sdbot-") and len(key) == 49 and row.prefix == key[:12]
        found = await db.api_key(key)
        assert found is not None and (found.user_id, found.guild_id, found.name) == (2, 1, "krita")
        assert (await db.api_keys_of(1, 2))[0].last_used is not None
        assert await db.api_key(key + "x") is None and await db.api_key(key[:-1]) is None
        # Only the member who owns it, in its server, can revoke it.
        assert await db.revoke_api_key(1, 99, "krita") is None
        assert await db.revoke_api_key(2, 2, "krita") is None
        assert await db.revoke_api_key(1, 2, "") is None
        revoked = await db.revoke_api_key(1, 2, "krita")
        assert revoked is not None and revoked.id == row.id
        assert await db.api_key(key) is None and await db.api_keys_of(1, 2) == []
        # By id, shown prefix or the whole key too.
        for which in ("id", "prefix", "key"):
            key, row = await db.create_api_key(guild_id=1, user_id=2, user_name="amy", channel_id=3)
            ref = {"id": str(row.id), "prefix": row.prefix, "key": key}[which]
            assert (await db.revoke_api_key(1, 2, ref)) is not None, which
            assert await db.api_key(key) is None
        await db.set_api_key_options(row.id, {"sd_model_checkpoint": "tiny"})
    with sqlite3.connect(tmp_path / "k.db") as conn:
        stored = conn.execute("SELECT key_hash, options FROM api_keys").fetchall()
    assert (hash_key(key), '{"sd_model_checkpoint": "tiny"}') in stored
    assert all(len(h) == 64 for h, _ in stored)


async def test_the_api_keys_migration_applies_to_a_version_5_database(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "old.db") as db:
        pass
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("DROP TABLE api_keys")
        conn.execute("PRAGMA user_version = 5")
    async with await Database.open(tmp_path / "old.db") as db:
        assert await db.schema_version() == len(MIGRATIONS) == 6
        key, _ = await db.create_api_key(guild_id=1, user_id=2, user_name="a", channel_id=None)
        assert await db.api_key(key) is not None


def request_with(authorization: str | None) -> object:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return make_mocked_request("GET", "/sdapi/v1/options", headers=headers)


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "key"),
    [
        (basic("anyone:sdbot-abc"), "sdbot-abc"),
        (basic(":sdbot-abc"), "sdbot-abc"),
        (basic("user:pass:with:colons"), "pass:with:colons"),
        ("Bearer sdbot-abc", "sdbot-abc"),
        ("bearer   sdbot-abc  ", "sdbot-abc"),
        (None, None),
        ("Bearer ", None),
        (basic("no-colon"), None),
        ("Basic %%%", None),
        ("Token sdbot-abc", None),
        ("Bearer " + "x" * 500, None),
    ],
)
def test_the_key_comes_from_basic_auth_or_a_bearer_token(
    authorization: str | None, key: str | None
) -> None:
    assert key_in(request_with(authorization)) == key  # type: ignore[arg-type]


def test_a1111_samplers_and_schedulers_become_sdbot_samplers() -> None:
    assert sampler_of(None, None) is None
    assert sampler_of("", "Automatic") is None
    assert sampler_of("euler a", None) == "Euler a"
    assert sampler_of("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert sampler_of("DPM++ 2M Karras", "automatic") == "DPM++ 2M Karras"
    assert sampler_of("DPM++ 2M Karras", "karras") == "DPM++ 2M Karras"
    with pytest.raises(InvalidRequest, match="no Karras schedule"):
        sampler_of("Euler a", "Karras")
    with pytest.raises(InvalidRequest, match="Unknown scheduler 'Exponential'"):
        sampler_of("Euler", "Exponential")
    with pytest.raises(InvalidRequest, match="needs a sampler_name"):
        sampler_of(None, "Karras")


def test_a1111_bodies_are_read_field_by_field() -> None:
    body = {
        "prompt": "p", "seed": -1, "steps": 20.0, "batch_size": 2, "n_iter": 2,
        "override_settings": {"sd_model_checkpoint": "tiny [a1b2c3d4]"}, "unknown": [1],
    }  # fmt: skip
    api = parse_request(body, "txt2img")
    assert (api.seed, api.steps, api.count, api.model) == (None, 20, 4, "tiny")
    assert model_name("sd15 [0123abcd]") == "sd15" and model_name("tiny") == "tiny"
    with pytest.raises(InvalidRequest, match="cfg_scale must be a number"):
        parse_request({"prompt": "p", "cfg_scale": "7"}, "txt2img")
    with pytest.raises(InvalidRequest, match=r"steps must be a whole number, got 2\.5"):
        parse_request({"prompt": "p", "steps": 2.5}, "txt2img")
    with pytest.raises(InvalidRequest, match="batch_size and n_iter must be at least 1"):
        parse_request({"prompt": "p", "n_iter": -1}, "txt2img")
    with pytest.raises(InvalidRequest, match="init_images"):
        parse_request({"prompt": "p"}, "img2img")
    edit = parse_request(
        {"prompt": "p", "init_images": ["data:image/png;base64,AAAA"], "mask": "BBBB",
         "inpainting_mask_invert": 1}, "img2img",
    )  # fmt: skip
    assert (edit.init_image, edit.mask, edit.mask_invert) == ("AAAA", "BBBB", True)
    assert "init_images" not in edit.stored() and edit.stored()["prompt"] == "p"


def test_the_bind_setting_is_host_and_port() -> None:
    for good in ("127.0.0.1:7860", "localhost:0", "[::1]:7860", "0.0.0.0:80", " host.lan:1 "):
        assert load_settings(_env_file=None, api_bind=good).api_bind == good.strip()
    assert load_settings(_env_file=None, api_bind="").api_bind is None
    for bad in ("7860", "http://127.0.0.1:7860", "host:99999", "a b:1", "[::1]"):
        with pytest.raises(SettingsError, match="SDBOT_API_BIND: must be host:port"):
            load_settings(_env_file=None, api_bind=bad)
    assert parse_bind("[::1]:7860") == ("::1", 7860) and parse_bind("a.b:0") == ("a.b", 0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


async def test_a_bind_beyond_this_machine_warns_and_a_taken_port_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = cast(
        ApiContext, SimpleNamespace(settings=load_settings(_env_file=None), tracker=JobTracker())
    )
    server = ApiServer(ctx)
    with caplog.at_level(logging.WARNING, logger="bot.http_api.server"):
        url = await server.start("0.0.0.0:0")
    try:
        assert re.fullmatch(r"http://0\.0\.0\.0:\d+", url)
        assert "clear text" in caplog.text
        taken = url.rsplit(":", 1)[1]
        with pytest.raises(OSError, match=f"cannot serve the HTTP API on 0.0.0.0:{taken}"):
            await ApiServer(ctx).start(f"0.0.0.0:{taken}")
    finally:
        await server.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bot.http_api.server"):
        quiet = ApiServer(ctx)
        await quiet.start("127.0.0.1:0")
        await quiet.close()
    assert "clear text" not in caplog.text
