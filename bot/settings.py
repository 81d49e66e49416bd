"""The one typed settings object, read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.catalog import (
    BUILTIN_SOURCES,
    SINGLE_FILE_SUFFIXES,
    Catalog,
    ModelEntry,
    is_hub_id,
)
from bot.errors import InvalidRequest, SettingsError

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_API_BIND_RE = re.compile(r"^\s*(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})\s*$")


def parse_bind(bind: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" as (host, port); the host a name, IPv4 or [IPv6], the
    port 0 to 65535 (0 picks a free one)."""
    match = _API_BIND_RE.match(bind)
    if match is None or int(match.group(3)) > 65535:
        raise ValueError(f"SDBOT_API_BIND {bind!r} is not host:port, e.g. 127.0.0.1:7860")
    return match.group(1) or match.group(2), int(match.group(3))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SDBOT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # Discord's own names, without our prefix, because every bot guide uses them.
    discord_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DISCORD_TOKEN", "discord_token")
    )
    discord_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("DISCORD_API_BASE", "discord_api_base")
    )
    # The Hugging Face Hub's own name: for gated and private models.
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HF_TOKEN", "hf_token")
    )

    db_path: Path = Path("data/sdbot.db")
    cache_dir: Path = Path("data/cache")
    default_model: str = "builtin:tiny"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    models_file: Path | None = None  # None: the catalog shipped with sdbot
    lora_dir: Path = Path("data/loras")
    queue_limit: int = Field(default=50, ge=1, le=10_000)
    user_queue_limit: int = Field(default=5, ge=1, le=1000)
    max_batch: int = Field(default=4, ge=1, le=64)
    max_loaded_models: int = Field(default=1, ge=1, le=16)
    preview_every: int = Field(default=5, ge=0, le=1000)  # steps between previews; 0 = none
    max_attachment_mb: float = Field(default=10.0, gt=0, le=500)
    max_attachment_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    allow_dms: bool = False
    retention_days: int = Field(default=0, ge=0, le=36_500)  # 0 = keep job rows forever
    outputs_dir: Path | None = None  # keep every generated PNG here; None = don't
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    playground_host: str = "127.0.0.1"
    playground_port: int = Field(default=8765, ge=0, le=65535)
    # The playground plays every member and admin: only this machine may reach it unless asked.
    playground_allow_remote: bool = False
    # Where generation runs: this process's GPU, or a Ray Serve deployment (bot/serve/).
    backend: Literal["local", "serve"] = "local"
    # A Ray address ("auto": the cluster this machine is a node of; ray:// is refused because
    # Ray Client cannot stream), or "local": start Ray in this process and deploy the app here
    # with serve_replicas replicas.
    serve_address: str = "local"
    serve_replicas: int = Field(default=1, ge=1, le=64)
    serve_app: str = Field(default="sdbot", min_length=1, max_length=64)
    # host:port of the AUTOMATIC1111-compatible HTTP API; None = off.
    api_bind: str | None = None
    # torch.compile the UNet (and VAE decoder) for a few size buckets; warm-up at start-up.
    compile: bool = False
    # CPU RAM (MB) that keeps evicted models' weights, so switching back is a copy; 0 = off.
    ram_cache_mb: int = Field(default=0, ge=0, le=1_048_576)

    @field_validator("discord_token", "hf_token", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("discord_api_base", mode="before")
    @classmethod
    def _check_api_base(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8765")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _token_only_over_tls(self) -> Settings:
        # The token is sent with every REST call: only over TLS, or to this machine.
        base = self.discord_api_base
        plain = base is not None and not base.startswith("https://")
        if self.discord_token and plain and not is_loopback_url(str(base)):
            raise ValueError(
                "DISCORD_API_BASE must be an https:// URL when DISCORD_TOKEN is set "
                "(plain http is allowed only to this machine: 127.0.0.1, ::1, localhost)"
            )
        return self

    @field_validator("api_bind", mode="before")
    @classmethod
    def _check_api_bind(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            if not isinstance(value, str):
                raise ValueError
            parse_bind(value)
        except ValueError:
            raise ValueError("must be host:port, e.g. 127.0.0.1:7860 or [::1]:7860") from None
        return value.strip()

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    @property
    def token(self) -> str | None:
        return self.discord_token.get_secret_value() if self.discord_token else None


def is_loopback_url(url: str) -> bool:
    """True when `url` names this machine (so plain http or ws cannot leak to the network)."""
    return is_loopback(urlsplit(url).hostname or "")


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an IP literal, no brackets) is this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name (or "" = every interface) may resolve anywhere


_ENV_NAMES = {
    "discord_token": "DISCORD_TOKEN",
    "discord_api_base": "DISCORD_API_BASE",
    "hf_token": "HF_TOKEN",
}


def env_name(field: str) -> str:
    return _ENV_NAMES.get(field, f"SDBOT_{field.upper()}")


def export_hub_token(settings: Settings) -> None:
    """Hand an HF_TOKEN read from `.env` to the Hub client, which reads only the environment.

    One already in the environment wins, as it does for every other setting.
    """
    if settings.hf_token and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = settings.hf_token.get_secret_value()


def load_settings(**overrides: object) -> Settings:
    """Build Settings or raise SettingsError with one line naming the bad variable.

    The value itself is never echoed: it may be the token.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a rule across settings names its variables in the message itself
            raise SettingsError(f"invalid settings: {msg}") from None
        name = env_name(loc) if loc in Settings.model_fields else loc
        raise SettingsError(f"invalid setting {name}: {msg}") from None


def check_default_model(settings: Settings, catalog: Catalog) -> ModelEntry:
    """The model SDBOT_DEFAULT_MODEL names, or SettingsError saying what is accepted.

    Checked at start-up so a typo stops the bot at once instead of failing every job that
    names no model. A catalog name is taken as it stands (the engine checks its source when it
    loads); anything else must be a source sdbot can load from here.
    """
    value = settings.default_model.strip()
    try:
        entry = catalog.resolve(value)
    except InvalidRequest:
        entry = None
    if entry is not None and (entry in catalog.entries or _loadable_source(entry.source)):
        return entry
    shown = value if len(value) <= 120 else value[:119] + "…"
    raise SettingsError(
        f"invalid setting SDBOT_DEFAULT_MODEL: {shown!r} is not a model of the catalog "
        f"({', '.join(catalog.names())}) nor a source sdbot can load: "
        f"{' or '.join(BUILTIN_SOURCES)}, a Hugging Face id `owner/name`, an existing diffusers "
        "folder, or an existing .safetensors/.ckpt file."
    )


def _loadable_source(source: str) -> bool:
    """Whether a source outside the catalog can be loaded, judged without reading weights."""
    if source.startswith("builtin:"):
        return source in BUILTIN_SOURCES
    path = Path(source).expanduser()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return path.is_file()
    if path.exists():
        return (path / "model_index.json").is_file()
    # A Hub id cannot be checked offline; a path-like spelling that is not there is a typo.
    return is_hub_id(source) and not source.startswith((".", "~"))
