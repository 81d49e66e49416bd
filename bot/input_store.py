"""Input pictures and masks kept on disk, content-addressed, beside the database.

Buttons under an img2img or inpaint result run the job again from its row; the picture it
started from was a Discord attachment, whose signed URL expires after about a day. So the
bytes a job used are kept here, named by their SHA-256 (`<db dir>/inputs/ab/abcd…`), and
the job rows name them (bot/db's `job_inputs`); retention deletes a file with the last row
that names it.

Every function here does blocking file or hashing work: call it in a thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(text: str) -> bool:
    """A hex SHA-256 as `digest` writes it: the only names that may become paths here."""
    return bool(_SHA256_RE.match(text))


def digest(data: bytes) -> str:
    """The name a picture is kept under: the hex SHA-256 of its bytes (blocking)."""
    return hashlib.sha256(data).hexdigest()


class InputStore:
    """One folder of kept inputs; a file's name is its bytes' hash, so one copy serves every
    job (and rerun) that used the same picture."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def beside(cls, db_path: Path | str) -> InputStore | None:
        """The store next to a database file; None for an in-memory database (nothing to
        keep across restarts, and no folder to put it in)."""
        text = str(db_path)
        if text == ":memory:" or text.startswith("file:"):
            return None
        return cls(Path(db_path).parent / "inputs")

    def path(self, sha256: str) -> Path:
        # The name becomes a path: only a real hash may, never "../" or a separator.
        if not is_sha256(sha256):
            raise ValueError(f"{sha256[:80]!r} is not a hex SHA-256")
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> Path:
        """Keep `data` under its hash, once; written to a temporary name and renamed, so a
        crash never leaves a partial file under a hash that readers would trust."""
        path = self.path(sha256)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{sha256}.{secrets.token_hex(4)}.tmp")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    def get(self, sha256: str) -> bytes | None:
        """The kept bytes, or None when the file is gone or no longer matches its name (a
        damaged disk): the caller then falls back to the URL."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None
        return data if digest(data) == sha256 else None
