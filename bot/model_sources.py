"""Where a model's weights are, checked cheaply and offline: built in, a local diffusers folder
or checkpoint file, or a Hugging Face Hub id (in the local Hub cache, or to be downloaded).

Nothing is read but a small JSON index and nothing is asked of the network, so the fronts may
list what is loadable (`availability`, safe from any thread) and the engine checks a model here
before it evicts a loaded one to make room (a model that cannot load then costs nothing).
No torch, no diffusers; huggingface_hub (its cache lookup) only when a Hub id is asked about.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from bot.catalog import (
    BUILTIN_SOURCES,
    BUILTIN_TINY,
    Catalog,
    ModelEntry,
    is_hub_id,
)
from bot.errors import ModelLoadError, SdbotError


def availability(catalog: Catalog, name: str) -> str | None:
    """None when model `name` (a catalog name or a source) can be loaded on this machine, else
    why not, in words for members: the reason names the model, never a path.

    A Hub model not in the local cache counts as available unless the Hub may not be asked
    (HF_HUB_OFFLINE): whether it is reachable would take the network. Not a promise that the
    weights are sound; loading tells that.
    """
    try:
        locate_source(catalog.resolve(name))
    except SdbotError as exc:
        return exc.message
    return None


def locate_source(entry: ModelEntry) -> tuple[str, str]:
    """(kind, location) of `entry`'s weights; kind is "builtin", "folder", "single_file" or
    "hub".

    Raises ModelLoadError naming the model, never a path (members see it); its cause, an
    OSError, has the path for the log and the job's row.
    """
    name, source = entry.public_name, entry.source.strip()
    if source in BUILTIN_SOURCES:
        return "builtin", source
    if source.startswith("builtin:"):
        known = ", ".join(f"`{name}`" for name in BUILTIN_SOURCES)
        raise ModelLoadError(f"Unknown built-in model `{source}`; the built-in ones are {known}.")
    path = Path(source).expanduser()
    if entry.is_single_file:
        if not path.is_file():
            raise _refused(
                path,
                f"The checkpoint file of model `{name}` does not exist. Fix its `source` in the "
                "model catalog (the log names the path).",
            )
        index = Path(entry.config).expanduser() / "model_index.json" if entry.config else None
        if index is not None and not index.is_file():
            raise _refused(
                index,
                f"The `config` folder of model `{name}` is not a diffusers folder (no "
                "model_index.json). Point it at a diffusers copy of the same architecture, "
                "e.g. `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --exclude "
                "'*.safetensors' '*.bin' --local-dir <folder>`.",
            )
        return "single_file", str(path)
    if path.exists():
        if not path.is_dir():
            raise _refused(
                path,
                f"The source of model `{name}` is a file, not a diffusers model folder.",
                code=errno.ENOTDIR,
            )
        if not (path / "model_index.json").is_file():
            raise _refused(
                path / "model_index.json",
                f"The folder of model `{name}` is not a diffusers model folder: it has no "
                "model_index.json.",
            )
        return "folder", str(path)
    # An existing folder wins over a Hub id of the same spelling (e.g. `models/sd15`).
    if is_hub_id(source):
        if hub_offline() and not hub_cached(source):
            raise ModelLoadError(hub_unreachable(entry))
        return "hub", source
    raise _refused(
        path,
        f"The model folder of model `{name}` does not exist. Point its source at an existing "
        f"diffusers folder, a Hugging Face id like `owner/name`, or `{BUILTIN_TINY}` (the log "
        "names the path).",
    )


def _refused(path: Path, message: str, *, code: int = errno.ENOENT) -> ModelLoadError:
    """`message` for members; the path in the cause (OSError picks its subclass by `code`)."""
    error = ModelLoadError(message)
    error.__cause__ = OSError(code, os.strerror(code), str(path.absolute()))
    return error


def hub_unreachable(entry: ModelEntry) -> str:
    """What to tell members when a Hub model is not downloaded and the Hub cannot be asked."""
    source = entry.source.strip()
    name = f"`{source}`" if entry.public_name == source else f"`{entry.public_name}` (`{source}`)"
    return (
        f"Model {name} is not downloaded yet and the Hugging Face Hub cannot be reached. "
        "Connect this machine to the internet once so it can be downloaded (it is cached "
        f"after that), or download it elsewhere with `hf download {source} --local-dir "
        "<folder>` and set the model source to that local folder."
    )


def hub_offline() -> bool:
    """Whether the Hub may not be asked: HF_HUB_OFFLINE as huggingface_hub read it when it was
    imported (what diffusers goes by), or as it is set now (what the owner means)."""
    from huggingface_hub import constants  # lazy: only Hub ids need it

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or now


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a whole diffusers snapshot of `repo_id`: its
    model_index.json, each component's folder, and weights beside each model's config.json
    (an interrupted download leaves some out, and offline diffusers then fails to load it)."""
    from huggingface_hub import try_to_load_from_cache  # lazy: only Hub ids need it

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # a malformed id, an unreadable cache: not cached
        return False
    if not isinstance(found, str):  # None (not cached) or "known to be missing upstream"
        return False
    snapshot = Path(found).parent
    try:
        index = json.loads(Path(found).read_text(encoding="utf-8"))
        for component, spec in index.items():
            if component.startswith("_") or not isinstance(spec, list) or None in spec:
                continue  # metadata, or a part the model leaves out (a safety checker)
            folder = snapshot / component
            if not folder.is_dir():
                return False
            if (folder / "config.json").is_file() and not any(
                p.suffix in (".safetensors", ".bin") and p.exists() for p in folder.iterdir()
            ):
                return False
    except (OSError, ValueError, AttributeError):
        return False
    return True
