"""Files kept on disk: saved output PNGs with their paths in the row, pruned later, and the
content-addressed store of input pictures."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bench.harness import running_bot
from bot.engine import Engine
from bot.imaging import read_parameters
from bot.input_store import InputStore, digest
from bot.settings import Settings


async def test_outputs_are_saved_and_retention_prunes_rows_and_files(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    keep = settings.model_copy(update={"outputs_dir": tmp_path / "outputs"})
    async with running_bot(keep, engine=engine) as h:
        await h.control.slash("imagine", {"prompt": "keep me", "steps": 1, "count": 2, "seed": 4})
        await h.control.wait_for_message(
            lambda m: "seed `" in m["content"] and bool(m["attachments"])
        )
    with sqlite3.connect(settings.db_path) as conn:
        [(raw,)] = conn.execute("SELECT outputs FROM jobs").fetchall()
    paths = [Path(p) for p in json.loads(raw)]
    assert [p.name for p in paths] == ["job1_4.png", "job1_5.png"]
    assert "Seed: 5" in (read_parameters(paths[1].read_bytes()) or "")

    with sqlite3.connect(settings.db_path) as conn:
        conn.execute("UPDATE jobs SET queued_at='2000-01-01T00:00:00.000Z'")
    pruning = keep.model_copy(update={"retention_days": 30})
    async with running_bot(pruning, engine=engine):
        pass
    with sqlite3.connect(settings.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)
    assert not any(p.exists() for p in paths)


def test_input_pictures_are_kept_once_under_their_hash(tmp_path: Path) -> None:
    store = InputStore.beside(tmp_path / "db" / "sdbot.db")
    assert store is not None and store.root == tmp_path / "db" / "inputs"
    data = b"\x89PNG picture bytes"
    sha = digest(data)
    assert store.get(sha) is None
    path = store.put(sha, data)
    assert path == store.root / sha[:2] / sha and store.get(sha) == data
    assert store.put(sha, data) == path
    assert [p.name for p in store.root.rglob("*")] == [sha[:2], sha]  # no temporary left
    # A file that no longer matches its name is not trusted (the caller falls back to the URL).
    path.write_bytes(b"damaged")
    assert store.get(sha) is None
    for bad in ("../../etc/passwd", sha.upper(), sha[:-1], sha + "/x"):
        with pytest.raises(ValueError, match="SHA-256"):
            store.path(bad)
    assert InputStore.beside(":memory:") is None
