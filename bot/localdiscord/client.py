"""Client for the local server's control API: it plays the Discord users in tests and scripts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import aiohttp


class ControlError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{status}: {message}")
        self.status = status
        self.body = body
        self.message = str(message)


class ControlClient:
    """Plays the members through the control API of the server at `base_url`.

    The API needs the server's per-run token: pass `token` (`LocalDiscord.control_token`), or
    give the playground URL the server printed, whose `#token=...` fragment carries it.
    """

    def __init__(
        self, base_url: str, session: aiohttp.ClientSession, *, token: str | None = None
    ) -> None:
        url, _, fragment = base_url.partition("#")
        token = token or parse_qs(fragment).get("token", [None])[0]
        if not token:
            raise ValueError(
                "ControlClient needs the control token: pass token=server.control_token, "
                "or the playground URL with its #token=... fragment"
            )
        self.base_url = url.rstrip("/")
        self.session = session
        self._headers = {"Authorization": f"Bearer {token}"}
        self._world: dict[str, Any] | None = None

    async def _call(self, method: str, path: str, json: Any = None, **kw: Any) -> Any:
        if method != "GET" and json is None and "data" not in kw:
            json = {}  # the server takes only JSON (or image bytes) on state-changing requests
        headers = {**self._headers, **kw.pop("headers", {})}
        url = self.base_url + path
        async with self.session.request(method, url, json=json, headers=headers, **kw) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                raise ControlError(resp.status, body)
            return body

    async def world(self, *, refresh: bool = False) -> dict[str, Any]:
        if self._world is None or refresh:
            self._world = await self._call("GET", "/_control/world")
        return self._world

    async def default_channel(self) -> int:
        return int((await self.world())["channels"][0]["id"])

    async def admin_id(self) -> int:
        return int((await self.world())["admin_id"])

    async def member_id(self) -> int:
        return int((await self.world())["member_id"])

    async def add_user(self, username: str, *, admin: bool = False) -> int:
        user = await self._call("POST", "/_control/users", {"username": username, "admin": admin})
        return int(user["id"])

    async def upload(self, data: bytes, filename: str, content_type: str = "") -> dict[str, Any]:
        params = {"filename": filename, "content_type": content_type}
        headers = {"Content-Type": "application/octet-stream"}
        return await self._call(  # type: ignore[no-any-return]
            "POST", "/_control/attachments", data=data, params=params, headers=headers
        )

    async def slash(
        self,
        command: str,
        options: dict[str, Any] | None = None,
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        validate: bool = True,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Send a slash command as a user. With wait, returns once the bot acknowledged it."""
        body = {
            "command": command,
            "options": options or {},
            "user_id": str(user_id or await self.member_id()),
            "channel_id": str(channel_id or await self.default_channel()),
            "validate": validate,
            "wait": wait,
        }
        return await self._call("POST", "/_control/interactions", body)  # type: ignore[no-any-return]

    async def click(
        self,
        message_id: int | str,
        custom_id: str,
        *,
        user_id: int | None = None,
        validate: bool = True,
    ) -> dict[str, Any]:
        """Click a button. validate=False sends ids the message does not have (a forged click)."""
        body = {
            "message_id": str(message_id),
            "custom_id": custom_id,
            "user_id": str(user_id or await self.member_id()),
            "validate": validate,
        }
        return await self._call("POST", "/_control/components", body)  # type: ignore[no-any-return]

    async def context_menu(
        self, name: str, message_id: int | str, *, user_id: int | None = None
    ) -> dict[str, Any]:
        body = {
            "name": name,
            "message_id": str(message_id),
            "user_id": str(user_id or await self.member_id()),
        }
        return await self._call("POST", "/_control/context_menu", body)  # type: ignore[no-any-return]

    async def submit_modal(
        self, interaction_id: int | str, values: dict[str, str]
    ) -> dict[str, Any]:
        body = {"interaction_id": str(interaction_id), "values": values}
        return await self._call("POST", "/_control/modals", body)  # type: ignore[no-any-return]

    async def autocomplete(
        self,
        command: str,
        focused: str,
        options: dict[str, Any] | None = None,
        *,
        user_id: int | None = None,
    ) -> list[dict[str, Any]]:
        body = {
            "command": command,
            "focused": focused,
            "options": options or {},
            "user_id": str(user_id or await self.member_id()),
        }
        return (await self._call("POST", "/_control/autocomplete", body))["choices"]  # type: ignore[no-any-return]

    async def post_message(
        self,
        content: str = "",
        attachments: list[dict[str, Any]] | None = None,
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        buttons: list[str] | None = None,
        as_bot: bool = False,
    ) -> dict[str, Any]:
        """Post a message as a user, or with as_bot one the bot could have sent in the past."""
        row = [{"type": 2, "style": 2, "label": cid, "custom_id": cid} for cid in buttons or []]
        body = {
            "content": content,
            "components": [{"type": 1, "components": row}] if row else [],
            "as_bot": as_bot,
            "attachment_ids": [a["id"] for a in attachments or []],
            "user_id": str(user_id or await self.member_id()),
            "channel_id": str(channel_id or await self.default_channel()),
        }
        return await self._call("POST", "/_control/messages", body)  # type: ignore[no-any-return]

    async def interaction(self, interaction_id: int | str) -> dict[str, Any]:
        return await self._call("GET", f"/_control/interactions/{interaction_id}")  # type: ignore[no-any-return]

    async def expire(self, interaction_id: int | str) -> dict[str, Any]:
        return await self._call("POST", f"/_control/interactions/{interaction_id}/expire")  # type: ignore[no-any-return]

    async def messages(
        self, channel_id: int | None = None, *, viewer: int | None = None
    ) -> list[dict[str, Any]]:
        cid = channel_id or await self.default_channel()
        query = f"?viewer={viewer}" if viewer else ""
        return await self._call("GET", f"/_control/channels/{cid}/messages{query}")  # type: ignore[no-any-return]

    async def download(self, attachment: dict[str, Any]) -> bytes:
        async with self.session.get(attachment["url"]) as resp:
            resp.raise_for_status()
            return await resp.read()

    async def add_fault(self, method: str, path: str, status: int, count: int = 1) -> None:
        await self._call(
            "POST",
            "/_control/faults",
            {"method": method, "path": path, "status": status, "count": count},
        )

    async def disconnect_gateway(self) -> int:
        return int((await self._call("POST", "/_control/gateway/disconnect"))["closed"])

    async def wait_for_message(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        channel_id: int | None = None,
        viewer: int | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Poll the channel until a message matches (the way a person watches the channel)."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in await self.messages(channel_id, viewer=viewer):
                if predicate(msg):
                    return msg
            if time.monotonic() > deadline:
                raise TimeoutError("no matching message arrived in time")
            await asyncio.sleep(0.05)
