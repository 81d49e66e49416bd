"""Where a model's weights come from, and what to tell the owner when they cannot be read.

A catalog source is a built-in tiny model (SD or SDXL), a local diffusers folder, a single-file
checkpoint (.safetensors/.ckpt, with an optional local config folder), or a Hugging Face Hub
id. `locate` checks it without reading weights (`bot.model_sources`, the same check the fronts
list availability with), builds the tiny model, and asks the Hub for a model not downloaded
yet, so a model that cannot load is refused before a loaded model is evicted; `load_error`
turns what diffusers raised into a message that names the fix. Members see these messages:
they name the model, never a file on the server (the log has the paths).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from bot.catalog import BUILTIN_TINY_INPAINT, BUILTIN_TINY_XL, ModelEntry
from bot.errors import ModelLoadError
from bot.model_sources import hub_cached, hub_unreachable, locate_source
from bot.tiny_model import ensure_tiny_model
from bot.tiny_xl import ensure_tiny_xl

log = logging.getLogger(__name__)


def locate(entry: ModelEntry, cache_dir: Path) -> tuple[str, str]:
    """(kind, location): kind is "folder", "hub" or "single_file". Checked before a loaded
    model is evicted for this one, so a model that cannot load leaves the loaded ones be.

    Members see these errors: they name the model, never a path on the server (the log and,
    through the error's cause, the job's row have it).
    """
    try:
        kind, location = locate_source(entry)
    except ModelLoadError as exc:
        log.error("model %s cannot be loaded: %s", entry.name, exc.__cause__ or exc.message)
        raise
    if kind == "builtin":
        try:
            if location == BUILTIN_TINY_XL:
                folder = ensure_tiny_xl(cache_dir)
            else:
                folder = ensure_tiny_model(cache_dir, inpainting=location == BUILTIN_TINY_INPAINT)
        except Exception as exc:
            log.error("building %s in %s failed", location, cache_dir, exc_info=exc)
            raise ModelLoadError(
                f"Could not build the built-in tiny model `{entry.public_name}` in the cache "
                f"folder ({public_error(exc, cache_dir)}). Is SDBOT_CACHE_DIR writable? The "
                "log has the details."
            ) from exc
        return "folder", str(folder)
    if kind == "hub" and not hub_cached(location):
        _reach_hub(entry)
    return kind, location


def model_family(entry: ModelEntry, kind: str, location: str) -> str:
    """ "sd" or "sdxl": the catalog's `family`, else what the model's model_index.json names
    (a folder, the Hub cache, a single file's config folder); SD when nothing says."""
    if entry.family:
        return entry.family
    index: Path | None = None
    if kind == "folder":
        index = Path(location) / "model_index.json"
    elif kind == "single_file" and entry.config:
        index = Path(entry.config).expanduser() / "model_index.json"
    elif kind == "hub":
        # Lazy: huggingface_hub comes with diffusers, which only the worker thread imports.
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(location, "model_index.json")
        index = Path(found) if isinstance(found, str) else None
    try:
        name = str(json.loads(index.read_text(encoding="utf-8"))["_class_name"]) if index else ""
    except (OSError, ValueError, KeyError, TypeError):
        name = ""
    return "sdxl" if "StableDiffusionXL" in name else "sd"


def pipeline_family(pipe: Any) -> str:
    """ "sdxl" for a loaded SDXL pipeline (its UNet takes pooled text and time ids), else "sd"."""
    config = getattr(getattr(pipe, "unet", None), "config", None)
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sdxl" if "XL" in type(pipe).__name__ else "sd"


def _reach_hub(entry: ModelEntry) -> None:
    """Fetch the model's small model_index.json: proof, before anything is evicted, that the
    Hub answers and has the model (a typo, a gated or a private model fail here)."""
    # Lazy: huggingface_hub comes with diffusers, which only the worker thread imports.
    import huggingface_hub

    try:
        huggingface_hub.hf_hub_download(entry.source.strip(), "model_index.json")
    except Exception as exc:
        raise load_error(entry, "hub", entry.source, exc) from exc


def short_error(exc: BaseException, limit: int = 160) -> str:
    """`exc` as one short line for the log: its type and the start of its text."""
    return _one_line(exc, str(exc), limit)


def public_error(exc: BaseException, *known: str | Path | None, limit: int = 160) -> str:
    """short_error for members: diffusers and the OS name the files they failed on, and
    members must not learn where the server keeps its files. `known` paths go first (the
    pattern would stop at a space in them)."""
    return _one_line(exc, scrub_paths(str(exc), *known), limit)


def _one_line(exc: BaseException, text: str, limit: int) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# A path starts with a slash or backslash (after `~` or `C:` perhaps) that is not inside a
# word, a URL, a relative path or after a known path already replaced (`<path>/unet` stays),
# and runs to a space, a quote or a bracket. No nested or overlapping repetition: linear.
_PATH_RE = re.compile(r"""(?<![\w:/.~>\\-])(?:~|[A-Za-z]:)?[/\\][^\s'"`,;()\[\]{}<>]*""")


def scrub_paths(text: str, *known: str | Path | None) -> str:
    """`text` with `known` paths and every absolute file path in it replaced by `<path>`."""
    spellings: set[str] = set()
    for path in known:
        if path:
            full = Path(path).expanduser()
            spellings.update({str(path), str(full), str(full.absolute()), str(full.resolve())})
    for spelling in sorted(spellings, key=len, reverse=True):  # a folder after its files
        if len(spelling) > 1:
            text = text.replace(spelling, "<path>")
    return _PATH_RE.sub("<path>", text)


def load_error(entry: ModelEntry, kind: str, location: str, exc: Exception) -> ModelLoadError:
    """What to tell members (and the owner) when diffusers could not read the model at
    `location`: the model's name, what diffusers said without its paths, and the fix."""
    if kind == "hub":
        log.warning("loading hub model %s failed: %s", entry.source, short_error(exc, 400))
        return ModelLoadError(_hub_error_message(entry, exc))
    log.error("loading model %s from %s failed", entry.name, location, exc_info=exc)
    if kind == "single_file":
        hint = (
            "Is it a Stable Diffusion 1.x/2.x checkpoint, and does `config` describe the "
            "same architecture?"
            if entry.config
            else "Without a `config` folder in the catalog its configs come from the Hub, "
            "which needs the internet once; or set `config` to a local diffusers folder "
            "of the same architecture."
        )
        return ModelLoadError(
            f"Could not load the checkpoint of model `{entry.public_name}` "
            f"({public_error(exc, location, entry.config)}). {hint}"
        )
    return ModelLoadError(
        f"Could not load the model folder of model `{entry.public_name}` "
        f"({public_error(exc, location)}). Is it a complete Stable Diffusion 1.x/2.x "
        "diffusers folder?"
    )


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _hub_error_message(entry: ModelEntry, exc: BaseException) -> str:
    # Lazy: huggingface_hub comes with diffusers, which only the worker thread imports.
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    source = entry.source.strip()
    chain = _exception_chain(exc)
    # diffusers wraps everything in one OSError; the root cause says which fix applies.
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (
            f"Model `{source}` is gated on the Hugging Face Hub. Accept its license on "
            f"https://huggingface.co/{source} and log in on this machine with `hf auth login`, "
            "then try again."
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (
            f"Model `{source}` was not found on the Hugging Face Hub. Check the spelling "
            "(it looks like `owner/name`), or log in with `hf auth login` if it is private."
        )
    if any(isinstance(e, RemoteEntryNotFoundError) for e in chain):
        return (
            f"Model `{source}` on the Hugging Face Hub is not a diffusers model (it has no "
            "model_index.json). Pick a repository in the diffusers format, or download the "
            "checkpoint and set the model source to the .safetensors file."
        )
    offline = any(
        isinstance(
            e,
            (
                OfflineModeIsEnabled,
                LocalEntryNotFoundError,
                ConnectionError,
                TimeoutError,
            ),
        )
        or type(e).__name__ in {"ConnectError", "ConnectTimeout", "gaierror"}
        for e in chain
    )
    if offline or "not fully cached locally" in str(exc) or "cached snapshot" in str(exc):
        return hub_unreachable(entry)
    return (
        f"Model `{source}` could not be loaded from the Hugging Face Hub ({public_error(exc)}). "
        "Check the id, or download it and set the model source to the local folder."
    )
