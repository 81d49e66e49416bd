"""The local server's control API acts as any member and can post as the bot, so only the person
who started it may drive it: not another local process without the token, not a web page they
visit (cross-site requests, DNS rebinding), not the network. The page's escaping is checked in
a real browser in test_browser.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bot.localdiscord.client import ControlClient, ControlError
from bot.localdiscord.server import LocalDiscord


@pytest.fixture
async def server() -> AsyncIterator[LocalDiscord]:
    server = LocalDiscord()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(server: LocalDiscord) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.control_token}"}


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_the_control_api_answers_the_token_holder(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    status, world = await status_of(
        http, "GET", server.base_url + "/_control/world", headers=bearer(server)
    )
    assert status == 200 and world["guild_id"]


async def test_without_the_token_the_control_api_refuses_with_401(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    world = server.base_url + "/_control/world"
    assert (await status_of(http, "GET", world))[0] == 401
    users = server.base_url + "/_control/users"
    assert (await status_of(http, "POST", users, json={"username": "mallory", "admin": True}))[
        0
    ] == 401
    assert "mallory" not in [u.username for u in server.world.users.values()]


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong-token", "Bearer ", "Basic Zm9vOmJhcg==", "Bot {bot_token}", "{control_token}"],
)
async def test_a_wrong_token_gets_401(
    server: LocalDiscord, http: aiohttp.ClientSession, authorization: str
) -> None:
    header = authorization.format(bot_token=server.bot_token, control_token=server.control_token)
    status, body = await status_of(
        http, "GET", server.base_url + "/_control/world", headers={"Authorization": header}
    )
    assert status == 401
    assert "token" in body["message"]


async def test_a_request_from_another_web_page_is_refused_with_403(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    url = server.base_url + "/_control/users"
    for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
        headers = {**bearer(server), "Origin": origin}
        status, _ = await status_of(http, "POST", url, json={"username": "x"}, headers=headers)
        assert status == 403, origin
    # The page itself, from any loopback name of this server, is its own origin.
    for own in (server.base_url, f"http://localhost:{server.port}"):
        headers = {**bearer(server), "Origin": own}
        status, _ = await status_of(http, "POST", url, json={"username": "x"}, headers=headers)
        assert status == 200, own


async def test_a_foreign_host_header_is_refused_against_dns_rebinding(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    # A rebinding page is same-origin with itself (its Origin matches its Host), so only the
    # Host header tells it apart, on the page, the control API and the Discord side alike.
    for path in ("/_control/world", "/", "/api/v10/users/@me"):
        for host in (f"evil.example:{server.port}", "127.0.0.1:1", "evil.example"):
            headers = {**bearer(server), "Host": host, "Origin": f"http://{host}"}
            status, _ = await status_of(http, "GET", server.base_url + path, headers=headers)
            assert status == 403, (path, host)
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}"):
        headers = {**bearer(server), "Host": host}
        status, _ = await status_of(
            http, "GET", server.base_url + "/_control/world", headers=headers
        )
        assert status == 200, host


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/_control/users", "text/plain"),
        ("/_control/users", "application/x-www-form-urlencoded"),
        ("/_control/users", "multipart/form-data; boundary=x"),
        ("/_control/gateway/disconnect", "text/plain"),
        ("/_control/attachments", "text/plain"),
        ("/_control/attachments", "multipart/form-data; boundary=x"),
    ],
)
async def test_posts_an_html_form_could_send_are_refused_with_415(
    server: LocalDiscord, http: aiohttp.ClientSession, path: str, content_type: str
) -> None:
    # Even with the token: these are the content types a cross-site form posts without asking.
    headers = {**bearer(server), "Content-Type": content_type}
    before = len(server.world.users)
    status, body = await status_of(
        http, "POST", server.base_url + path, data=b'{"username": "x"}', headers=headers
    )
    assert status == 415, body
    assert len(server.world.users) == before


async def test_a_post_without_a_content_type_is_refused(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    # What a no-cors fetch of a Blob sends; aiohttp would report it as octet-stream.
    status, _ = await status_of(
        http,
        "POST",
        server.base_url + "/_control/users",
        data=b'{"username": "x"}',
        headers=bearer(server),
        skip_auto_headers=["Content-Type"],
    )
    assert status == 415


async def test_the_playground_page_loads_without_the_token_and_runs_no_inline_script(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.base_url + "/") as resp:
        assert resp.status == 200
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    assert "sdbot playground" in page
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert "frame-ancestors 'none'" in csp
    async with http.get(server.base_url + "/playground.js") as resp:
        assert resp.status == 200 and "escapeHtml" in await resp.text()


async def test_the_printed_url_carries_the_token_for_the_control_client(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    assert server.playground_url == f"{server.base_url}/#token={server.control_token}"
    via_url = ControlClient(server.playground_url, http)
    assert (await via_url.world())["guild_id"]
    via_token = ControlClient(server.base_url, http, token=server.control_token)
    assert await via_token.add_user("friend")
    with pytest.raises(ValueError, match="control token"):
        ControlClient(server.base_url, http)
    with pytest.raises(ControlError) as refused:
        await ControlClient(server.base_url, http, token="guess").world()
    assert refused.value.status == 401


async def test_the_discord_side_still_needs_the_bot_token(
    server: LocalDiscord, http: aiohttp.ClientSession
) -> None:
    me = server.base_url + "/api/v10/users/@me"
    assert (await status_of(http, "GET", me))[0] == 401
    assert (await status_of(http, "GET", me, headers=bearer(server)))[0] == 401
    auth = {"Authorization": f"Bot {server.bot_token}"}
    status, body = await status_of(http, "GET", me, headers=auth)
    assert status == 200 and body["bot"] is True


async def test_listening_beyond_loopback_needs_an_explicit_yes() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.com", ""):
        server = LocalDiscord()
        try:
            with pytest.raises(ValueError, match="allow_remote"):
                await server.start(host, 0)
        finally:
            await server.close()


async def test_allowing_remote_access_still_requires_the_token(
    http: aiohttp.ClientSession,
) -> None:
    server = LocalDiscord()
    await server.start("0.0.0.0", 0, allow_remote=True)
    try:
        url = f"http://127.0.0.1:{server.port}/_control/world"
        assert (await status_of(http, "GET", url))[0] == 401
        # Any host name may reach it now, but a page may still only call its own origin.
        headers = {**bearer(server), "Host": f"box.lan:{server.port}"}
        assert (await status_of(http, "GET", url, headers=headers))[0] == 200
        cross = {**headers, "Origin": "http://evil.example"}
        assert (await status_of(http, "GET", url, headers=cross))[0] == 403
    finally:
        await server.close()
