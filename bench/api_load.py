"""The API share of the load bench (`--api-share`): members who call the bot's
AUTOMATIC1111-compatible API instead of typing /imagine, on the same fair queue.

Their keys are made in the bot's database, as /apikey create makes them; their calls run in
the local server's process with the Discord members' (elsewhere, as real clients are), and
each waits for its images, as A1111 clients do. What they saw is summed up in `ApiFigures`.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.loop_watch import quantile
from bot.db import Database

#: What an API member asks for: what a Discord member's /imagine in the bench asks for.
STEPS = 2


@dataclass
class ApiCalls:
    """Per API request: its HTTP status (0: no answer) and how long the answer took."""

    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def make_keys(
    db: Database, *, guild_id: int, channel_id: int, user_ids: dict[int, int]
) -> dict[int, str]:
    """A key per API member (user index -> key), made in the server and channel the Discord
    members use."""
    keys = {}
    for index, user_id in user_ids.items():
        key, _ = await db.create_api_key(
            guild_id=guild_id, user_id=user_id, user_name=f"user{index}", channel_id=channel_id
        )
        keys[index] = key
    return keys


async def call_txt2img(
    session: aiohttp.ClientSession, url: str, key: str, i: int, calls: ApiCalls
) -> None:
    """One request, as an A1111 client sends it (Basic auth, key as password)."""
    body = {"prompt": f"load test {i}", "steps": STEPS, "seed": i, "sampler_name": "Euler"}
    started = time.perf_counter()
    status = 0
    try:
        auth = aiohttp.BasicAuth("bench", key)
        async with session.post(f"{url}/sdapi/v1/txt2img", json=body, auth=auth) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        calls.errors.append(repr(exc))
    calls.statuses.append(status)
    calls.seconds.append(time.perf_counter() - started)


@dataclass
class ApiFigures:
    requests: int
    answered: int
    statuses: dict[int, int]
    p50_ms: float
    p99_ms: float
    rows: int
    row_statuses: dict[str, int]
    errors: list[str]

    @classmethod
    def of(cls, requests: int, calls: ApiCalls, rows: list[Any]) -> ApiFigures:
        """From the calls and the rows of API jobs ((status,) tuples)."""
        answered = [s for s, st in zip(calls.seconds, calls.statuses, strict=True) if st]
        return cls(
            requests=requests,
            answered=len(answered),
            statuses=dict(Counter(calls.statuses)),
            p50_ms=statistics.median(answered) * 1000 if answered else 0.0,
            p99_ms=quantile(answered, 0.99) * 1000,
            rows=len(rows),
            row_statuses=dict(Counter(r[0] for r in rows)),
            errors=calls.errors,
        )

    def problems(self) -> list[str]:
        out = []
        if self.answered < self.requests:
            out.append(f"{self.requests - self.answered} API requests got no answer")
        if self.rows != self.requests:
            out.append(f"API requests lost: {self.requests} sent, {self.rows} job rows")
        errors = sum(n for status, n in self.statuses.items() if status >= 500)
        if errors:
            out.append(f"{errors} API requests answered with a server error")
        return out

    def lines(self) -> list[tuple[str, str]]:
        refused = {s: n for s, n in self.statuses.items() if 400 <= s < 500}
        return [
            ("API requests answered", f"{self.answered} of {self.requests}"),
            ("API time to answer (images) p50 / p99", f"{self.p50_ms:.1f} / {self.p99_ms:.1f} ms"),
            ("API finished / refused / failed",
             f"{self.statuses.get(200, 0)} / {sum(refused.values())} {refused or ''} / "
             f"{sum(n for s, n in self.statuses.items() if s >= 500)}"),
            ("API job rows", f"{self.rows}  {self.row_statuses}"),
        ]  # fmt: skip
