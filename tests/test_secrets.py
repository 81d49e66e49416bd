"""The token goes only where it is safe: over TLS, or to this machine."""

from __future__ import annotations

import pytest

from bot.errors import SettingsError
from bot.settings import is_loopback_url, load_settings

TOKEN = "MTIz.secret-token-value"


@pytest.mark.parametrize(
    "base", ["http://discord.example.com", "http://10.0.0.5:8765", "http://127.0.0.1.evil.com"]
)
def test_a_real_token_is_never_sent_over_plain_http_to_another_machine(base: str) -> None:
    with pytest.raises(SettingsError, match="DISCORD_API_BASE must be an https") as caught:
        load_settings(discord_token=TOKEN, discord_api_base=base, _env_file=None)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "base",
    [
        "https://discord.example.com",
        "http://127.0.0.1:8765",
        "http://localhost:1",
        "http://[::1]:9",
    ],
)
def test_tls_or_loopback_is_accepted(base: str) -> None:
    assert load_settings(discord_token=TOKEN, discord_api_base=base, _env_file=None).token == TOKEN


def test_without_a_token_any_local_server_may_be_named() -> None:
    assert load_settings(discord_api_base="http://192.168.1.9:8765", _env_file=None).token is None


def test_loopback_urls() -> None:
    assert is_loopback_url("ws://127.0.0.2:1/gateway")
    assert not is_loopback_url("wss://gateway.discord.gg/")
    assert not is_loopback_url("http://localhost.evil.com/")
