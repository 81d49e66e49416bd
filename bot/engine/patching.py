"""A method replaced on one instance for the length of a `with` block.

Exact batches (bot/engine/exact.py) wrap a UNet's `forward` and previews
(bot/engine/previews.py) a scheduler's `step` for one pipeline call. Both set the wrapper as an
instance attribute, which shadows the class's method, and must leave the object as it was:
an attribute the instance already had (torch.compile's dispatcher on a UNet) is put back, and
one it did not have is deleted, so the class's method shows through again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.<name>` is `value` inside the block, and what it was after (even on error)."""
    had_own = name in vars(obj)
    own = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, own)
        else:
            delattr(obj, name)
