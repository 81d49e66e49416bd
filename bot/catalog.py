"""The model catalog (`models.toml`) and the LoRA / embedding folders.

Pure data: no torch, no diffusers, so the front end can list models and validate a choice
without touching the GPU thread. The engine resolves a request's `model` through it.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.errors import InvalidRequest, SettingsError
from bot.jobs import MAX_GUIDANCE, MAX_STEPS, MIN_GUIDANCE, MIN_STEPS
from bot.samplers import canonical_name

BUILTIN_TINY = "builtin:tiny"
#: A 9-input-channel (inpainting) variant of the tiny model, for tests of the native path.
BUILTIN_TINY_INPAINT = "builtin:tiny-inpaint"
#: A tiny random-weight SDXL model (two text encoders, pooled embeddings, time ids).
BUILTIN_TINY_XL = "builtin:tiny-xl"
BUILTIN_SOURCES = (BUILTIN_TINY, BUILTIN_TINY_INPAINT, BUILTIN_TINY_XL)
#: Model families: which diffusers pipelines a model runs on.
FAMILIES = ("sd", "sdxl")
TINY_NATIVE_SIZE = 64
DEFAULT_NATIVE_SIZE = 512
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
#: Embeddings live beside the LoRAs by default (A1111 keeps them in their own folder too).
EMBEDDINGS_SUBDIR = "embeddings"

# Names end up in Discord choices and PNG metadata: keep them short and unambiguous.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FIELDS = (
    "source", "native_size", "size", "speed", "quality", "description", "config",
    "steps", "guidance", "sampler", "variant", "family",
)  # fmt: skip
_VARIANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MIN_NATIVE, _MAX_NATIVE = 64, 2048


@dataclass(frozen=True)
class ModelEntry:
    """One model members can choose: where to load it from and what to tell them about it."""

    name: str
    source: str
    native_size: int = DEFAULT_NATIVE_SIZE
    size: str = ""
    speed: str = ""
    quality: str = ""
    description: str = ""
    #: For single-file checkpoints: a local diffusers folder holding the architecture configs.
    config: str | None = None
    #: The model's own defaults, used when a member gives none (None: the server's).
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    #: Weights variant to download (e.g. "fp16"); the default weights when the repo has none.
    variant: str | None = None
    #: "sd" or "sdxl"; None: found out when loading (SD unless its model_index names SDXL).
    family: str | None = None

    @property
    def is_single_file(self) -> bool:
        return self.source.lower().endswith(SINGLE_FILE_SUFFIXES)

    @property
    def public_name(self) -> str:
        """The name to show members. A model not in the catalog is named by its source, and
        when that is a local path only its last part is shown: members must not learn where
        the server keeps its files."""
        name = self.name
        if _NAME_RE.match(name) or name.startswith("builtin:") or is_hub_id(name):
            return name
        return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "model"


@dataclass(frozen=True)
class Catalog:
    entries: tuple[ModelEntry, ...]
    lora_dir: Path
    embeddings_dir: Path
    #: The TOML file it came from (None: the one shipped with sdbot), for error messages.
    path: Path | None = None
    _by_name: Mapping[str, ModelEntry] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not self.entries:
            raise SettingsError(f"{self._where()} lists no models; add at least one [models.NAME].")
        # Case-insensitive lookup: members type names into a slash command.
        object.__setattr__(self, "_by_name", {e.name.lower(): e for e in self.entries})

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: Path | None, lora_dir: Path, *, embeddings_dir: Path | None = None
    ) -> Catalog:
        """Read a catalog file (None: the shipped `bot/models.toml`).

        Raises SettingsError naming the file (and the entry) when it is missing or malformed.
        """
        lora_dir = Path(lora_dir).expanduser()
        embeddings = Path(embeddings_dir).expanduser() if embeddings_dir else None
        embeddings = embeddings or lora_dir / EMBEDDINGS_SUBDIR
        if path is None:
            text = importlib.resources.files("bot").joinpath("models.toml").read_text("utf-8")
            where, base = "the shipped bot/models.toml", None
        else:
            path = Path(path).expanduser()
            where, base = str(path), path.parent
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise SettingsError(
                    f"The model catalog {path} does not exist. Fix SDBOT_MODELS_FILE, or unset it "
                    "to use the catalog shipped with sdbot."
                ) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise SettingsError(f"The model catalog {path} cannot be read ({exc}).") from None
        entries = parse_catalog(text, where=where, base=base)
        return cls(entries, lora_dir, embeddings, path)

    # -- lookups ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def default(self) -> ModelEntry:
        return self.entries[0]

    def get(self, name: str) -> ModelEntry:
        """A catalog entry by name; the only lookup to use for names members typed."""
        entry = self._by_name.get(str(name).strip().lower())
        if entry is None:
            raise InvalidRequest(
                f"Unknown model {str(name)!r}. Available: {', '.join(self.names())}."
            )
        return entry

    def resolve(self, name_or_source: str) -> ModelEntry:
        """A catalog name, or a source (builtin:tiny, a folder, a hub id, a checkpoint file).

        For settings and the shell (SDBOT_DEFAULT_MODEL, `sdbot generate --model`), where the
        owner may name a model that is not in the catalog. A source that an entry already uses
        resolves to that entry, so both spellings share one loaded pipeline.
        """
        text = str(name_or_source).strip()
        entry = self._by_name.get(text.lower())
        if entry is not None:
            return entry
        for entry in self.entries:
            if entry.source == text:
                return entry
        if not looks_like_source(text):
            raise InvalidRequest(
                f"Unknown model {text!r}. Available: {', '.join(self.names())} "
                f"(or a source: {BUILTIN_TINY}, a Hub id `owner/name`, a folder or a "
                ".safetensors file)."
            )
        return ModelEntry(
            name=text,
            source=text,
            native_size=probe_native_size(text),
            description="Not in the catalog; loaded from its source.",
            family=source_family(text),
        )

    def loras(self) -> list[str]:
        """Names (file stems) of the LoRA .safetensors files in the LoRA folder."""
        return _stems(self.lora_dir, (".safetensors",))

    def lora_path(self, name: str) -> Path:
        # Only names listed from the folder are accepted, so `../x` can never escape it.
        for file in _files(self.lora_dir, (".safetensors",)):
            if file.stem == name:
                return file
        available = self.loras()
        if not available:
            raise InvalidRequest(f"Unknown LoRA {name!r}: no LoRAs are installed on this bot.")
        raise InvalidRequest(f"Unknown LoRA {name!r}. Available: {', '.join(available)}.")

    def embeddings(self) -> list[str]:
        """Textual-inversion embeddings (file stems); a prompt uses one by writing its name."""
        return _stems(self.embeddings_dir, EMBEDDING_SUFFIXES)

    def embedding_path(self, name: str) -> Path:
        for file in _files(self.embeddings_dir, EMBEDDING_SUFFIXES):
            if file.stem == name:
                return file
        raise InvalidRequest(f"Unknown embedding {name!r}.")

    def _where(self) -> str:
        return str(self.path) if self.path else "the shipped bot/models.toml"


# -- parsing ------------------------------------------------------------------------------


def parse_catalog(text: str, *, where: str, base: Path | None = None) -> tuple[ModelEntry, ...]:
    """Entries of a catalog's TOML text; `where` names the file in every error message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"The model catalog {where} is not valid TOML: {exc}.") from None
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise SettingsError(
            f"The model catalog {where} has unknown top-level keys {', '.join(unknown)}; "
            "models go in [models.NAME] tables."
        )
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise SettingsError(f"The model catalog {where} lists no models; add [models.NAME] tables.")
    return tuple(_entry(name, raw, where=where, base=base) for name, raw in models.items())


def _entry(name: str, raw: Any, *, where: str, base: Path | None) -> ModelEntry:
    def bad(problem: str) -> SettingsError:
        return SettingsError(f"The model catalog {where}, model {name!r}: {problem}.")

    if not _NAME_RE.match(name):
        raise bad(
            "the name must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not isinstance(raw, dict):
        raise bad("expected a table of fields ([models.NAME] with source = ...)")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise bad("`source` is missing; give builtin:tiny, a Hub id, a folder or a checkpoint")
    native = raw.get("native_size", DEFAULT_NATIVE_SIZE)
    if isinstance(native, bool) or not isinstance(native, int):
        raise bad(f"`native_size` must be a whole number of pixels, got {native!r}")
    if not _MIN_NATIVE <= native <= _MAX_NATIVE or native % 8:
        raise bad(
            f"`native_size` {native} must be a multiple of 8 from {_MIN_NATIVE} to {_MAX_NATIVE}"
        )
    texts: dict[str, Any] = {}
    for key in ("size", "speed", "quality", "description"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise bad(f"`{key}` must be text, got {value!r}")
        texts[key] = value.strip()
    config = raw.get("config")
    if config is not None and (not isinstance(config, str) or not config.strip()):
        raise bad("`config` must be the path of a local diffusers folder")
    source = _relative_to(source.strip(), base)
    if config is not None and not source.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise bad("`config` is only for single-file (.safetensors/.ckpt) sources")
    return ModelEntry(
        name=name,
        source=source,
        native_size=native,
        config=_relative_to(config.strip(), base, always=True) if config else None,
        **texts,
        **_defaults(raw, source, bad),
    )


def _defaults(raw: dict[str, Any], source: str, bad: Any) -> dict[str, Any]:
    """The entry's own defaults and loading options (steps, guidance, sampler, variant, family),
    checked with the same ranges a request is."""
    out: dict[str, Any] = {}
    steps = raw.get("steps")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise bad(f"`steps` must be a whole number, got {steps!r}")
        if not MIN_STEPS <= steps <= MAX_STEPS:
            raise bad(f"`steps` {steps} is out of range; use {MIN_STEPS} to {MAX_STEPS}")
        out["steps"] = steps
    guidance = raw.get("guidance")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise bad(f"`guidance` must be a number, got {guidance!r}")
        if not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE:
            raise bad(
                f"`guidance` {guidance} is out of range; use {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}"
            )
        out["guidance"] = float(guidance)
    sampler = raw.get("sampler")
    if sampler is not None:
        if not isinstance(sampler, str):
            raise bad(f"`sampler` must be a sampler name, got {sampler!r}")
        try:
            out["sampler"] = canonical_name(sampler)
        except InvalidRequest as exc:
            raise bad(f"`sampler`: {exc.message.rstrip('.')}") from None
    variant = raw.get("variant")
    if variant is not None:
        if not isinstance(variant, str) or not _VARIANT_RE.match(variant):
            raise bad(f'`variant` must be a weights variant such as "fp16", got {variant!r}')
        out["variant"] = variant
    family = raw.get("family")
    if family is not None and family not in FAMILIES:
        raise bad(f"`family` must be one of {', '.join(FAMILIES)}, got {family!r}")
    out["family"] = family if family is not None else source_family(source)
    return out


def _relative_to(value: str, base: Path | None, *, always: bool = False) -> str:
    """Resolve a relative path against the catalog's folder when that is where it exists.

    Hub ids look like relative paths (`owner/name`), so they stay as written unless a file or
    folder of that name really is beside the catalog.
    """
    if base is None or value.startswith("builtin:"):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    if always or candidate.exists() or value.startswith(("./", "../")):
        return str(candidate)
    return value


# -- helpers shared with bot.engine and bench ---------------------------------------------


def source_family(source: str) -> str | None:
    """The family a source is known to have before loading: the built-in tiny SDXL's (others
    are found out from their model_index.json at load)."""
    return "sdxl" if source == BUILTIN_TINY_XL else None


def looks_like_source(text: str) -> bool:
    """Whether `text` reads as a model source rather than a (mistyped) catalog name."""
    return (
        text.startswith("builtin:")
        or text.lower().endswith(SINGLE_FILE_SUFFIXES)
        or is_hub_id(text)
        or "/" in text
        or "\\" in text
        or text.startswith(("~", "."))
        or Path(text).expanduser().exists()
    )


def is_hub_id(text: str) -> bool:
    """Whether `text` is spelled like a Hugging Face Hub id (`owner/name`)."""
    return bool(_HUB_ID_RE.match(text))


def probe_native_size(source: str) -> int:
    """The square size a source was trained at, without loading weights.

    Read from the diffusers config files when the source is a local folder (cheap); SD 1.x's
    512 otherwise, since a Hub id's configs may not be downloaded yet.
    """
    if source in BUILTIN_SOURCES:
        return TINY_NATIVE_SIZE
    folder = Path(source).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        size = unet["sample_size"]
        return int(size if isinstance(size, int) else size[0]) * scale
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return DEFAULT_NATIVE_SIZE


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    try:
        found = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    except OSError:  # a missing folder means "none installed", not an error
        return []
    return sorted(found, key=lambda p: p.name.lower())


def _stems(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for file in _files(folder, suffixes):
        seen.setdefault(file.stem, None)
    return list(seen)
