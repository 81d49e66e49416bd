"""Optionally keep every generated PNG on disk, as the old Flask app did, for the owner."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path


def save(folder: Path, job_id: int, pngs: Sequence[bytes], seeds: Sequence[int]) -> list[str]:
    """Write one file per image under folder/YYYY-MM-DD/; returns the paths (blocking I/O)."""
    day = folder / datetime.now(UTC).date().isoformat()
    day.mkdir(parents=True, exist_ok=True)
    paths = []
    for png, seed in zip(pngs, seeds, strict=True):
        path = day / f"job{job_id}_{seed}.png"
        path.write_bytes(png)
        paths.append(str(path))
    return paths


def remove(paths: Sequence[str]) -> int:
    """Delete saved images (retention); missing files are fine."""
    removed = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
            removed += 1
    return removed
