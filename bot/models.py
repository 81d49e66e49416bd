"""Facts about a model source that the front end needs without loading any weights."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

BUILTIN_TINY = "builtin:tiny"
TINY_NATIVE_SIZE = 64
DEFAULT_NATIVE_SIZE = 512


@lru_cache(maxsize=64)
def native_size(source: str) -> int:
    """The square size a model was trained at: the default when a user gives none.

    Read from the diffusers config files when the source is a local folder (cheap, no weights);
    SD 1.x's 512 otherwise.
    """
    if source == BUILTIN_TINY:
        return TINY_NATIVE_SIZE
    folder = Path(source).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        size = unet["sample_size"]
        return int(size if isinstance(size, int) else size[0]) * scale
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_NATIVE_SIZE
