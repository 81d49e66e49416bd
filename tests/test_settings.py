from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.catalog import BUILTIN_SOURCES, Catalog
from bot.errors import SettingsError
from bot.settings import Settings, check_default_model, export_hub_token, load_settings

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


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.load(None, Path("loras"))


def _default(value: str) -> Settings:
    return load_settings(_env_file=None, default_model=value)


def test_the_default_model_may_be_a_catalog_name_or_a_loadable_source(
    tmp_path: Path, catalog: Catalog
) -> None:
    folder = tmp_path / "sd15-local"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    checkpoint = tmp_path / "dream.safetensors"
    checkpoint.write_bytes(b"weights")
    cases = {
        "sd15": "sd15",  # a catalog name, any case
        "TINY": "tiny",
        "builtin:tiny": "tiny",  # an entry's source is that entry
        "builtin:tiny-inpaint": "builtin:tiny-inpaint",
        "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
        "someone/their-model": "someone/their-model",  # a Hub id: checked when it loads
        str(folder): str(folder),
        str(checkpoint): str(checkpoint),
    }
    for value, name in cases.items():
        assert check_default_model(_default(value), catalog).name == name


@pytest.mark.parametrize(
    "value",
    [
        "stable-diffusion-1.5",  # neither a name nor a source
        "builtin:tiny-xxl",
        "./models/sd15",  # a path that is not there
        "{tmp}/empty",  # a folder that is not a diffusers model
        "{tmp}/missing.safetensors",
        "~/nowhere/model",
    ],
)
def test_a_bad_default_model_names_the_setting_and_what_is_accepted(
    tmp_path: Path, catalog: Catalog, value: str
) -> None:
    (tmp_path / "empty").mkdir()
    value = value.format(tmp=tmp_path)
    with pytest.raises(SettingsError) as refused:
        check_default_model(_default(value), catalog)
    assert refused.value.message == (
        f"invalid setting SDBOT_DEFAULT_MODEL: {value!r} is not a model of the catalog "
        f"({', '.join(catalog.names())}) nor a source sdbot can load: "
        f"{' or '.join(BUILTIN_SOURCES)}, a Hugging Face id `owner/name`, an existing "
        "diffusers folder, or an existing .safetensors/.ckpt file."
    )


def test_hf_token_from_dotenv_reaches_the_hub_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub reads HF_TOKEN from the environment only; .env is sdbot's."""
    monkeypatch.setenv("HF_TOKEN", "restored-after-the-test")
    monkeypatch.delenv("HF_TOKEN")
    dotenv = tmp_path / ".env"
    dotenv.write_text("HF_TOKEN=hf_from_dotenv\n")
    settings = load_settings(_env_file=dotenv)
    assert "hf_from_dotenv" not in repr(settings)
    export_hub_token(settings)
    assert os.environ["HF_TOKEN"] == "hf_from_dotenv"
    # One in the environment wins, as for every setting.
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    export_hub_token(load_settings(_env_file=dotenv))
    assert os.environ["HF_TOKEN"] == "hf_from_env"
