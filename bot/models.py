"""Facts about a model that the front end needs without loading any weights.

Kept for callers that only have a model name or source; new code should ask the bot's
`Catalog` (`catalog.resolve(model).native_size`), which knows the owner's models.toml.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from bot.catalog import (
    BUILTIN_TINY,
    DEFAULT_NATIVE_SIZE,
    TINY_NATIVE_SIZE,
    Catalog,
    probe_native_size,
)
from bot.errors import InvalidRequest

__all__ = ["BUILTIN_TINY", "DEFAULT_NATIVE_SIZE", "TINY_NATIVE_SIZE", "native_size"]


@lru_cache(maxsize=1)
def _shipped() -> Catalog:
    # The LoRA folder plays no part in native sizes; any path will do.
    return Catalog.load(None, Path("data/loras"))


@lru_cache(maxsize=64)
def native_size(source: str, catalog: Catalog | None = None) -> int:
    """The square size a model (catalog name or source) was trained at: the default size.

    Looked up in `catalog` (default: the shipped one); for a source that is not in it, read
    from a local folder's config files, else SD 1.x's 512.
    """
    try:
        return (catalog or _shipped()).resolve(source).native_size
    except InvalidRequest:
        return probe_native_size(source)
