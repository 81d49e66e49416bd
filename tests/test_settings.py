from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.errors import SettingsError
from bot.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_discord_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "abc.def")
    monkeypatch.setenv("DISCORD_API_BASE", "http://127.0.0.1:9/")
    monkeypatch.setenv("SDBOT_QUEUE_LIMIT", "7")
    s = load_settings(_env_file=None)
    assert s.token == "abc.def" and s.discord_api_base == "http://127.0.0.1:9"
    assert s.queue_limit == 7 and s.default_model == "builtin:tiny"
    assert "abc.def" not in repr(s)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SDBOT_QUEUE_LIMIT", "lots", "invalid setting SDBOT_QUEUE_LIMIT"),
        ("SDBOT_QUEUE_LIMIT", "0", "invalid setting SDBOT_QUEUE_LIMIT"),
        ("SDBOT_DEVICE", "tpu", "invalid setting SDBOT_DEVICE: must be auto, cpu, mps, cuda"),
        ("DISCORD_API_BASE", "discord.local", "invalid setting DISCORD_API_BASE"),
        ("SDBOT_LOG_LEVEL", "LOUD", "invalid setting SDBOT_LOG_LEVEL"),
    ],
)
def test_a_malformed_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=expected):
        load_settings(_env_file=None)


def _sdbot(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SDBOT_", "DISCORD_"))}
    full_env.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_startup_stops_with_one_line_and_never_prints_the_token(tmp_path: Path) -> None:
    secret = "MTIz.secret-token-value"
    result = _sdbot(["run"], {"DISCORD_TOKEN": secret, "SDBOT_QUEUE_LIMIT": "many"}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sdbot: invalid setting SDBOT_QUEUE_LIMIT: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]
    assert secret not in result.stdout + result.stderr


def test_settings_are_read_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SDBOT_DEVICE=gpu0\n")
    result = _sdbot(["run"], {}, tmp_path)
    assert result.returncode == 2 and "invalid setting SDBOT_DEVICE" in result.stderr


def test_run_without_a_token_explains_what_to_do(tmp_path: Path) -> None:
    result = _sdbot(["run"], {}, tmp_path)
    assert result.returncode == 2
    assert "DISCORD_TOKEN is not set" in result.stderr and "sdbot playground" in result.stderr
