from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from bench.harness import Harness, running_bot
from bot.engine import Engine
from bot.settings import Settings, load_settings

# Tests never read a developer's .env or reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: the tiny model gains nothing from two, and the other core stays free for
# the event loop and the local Discord server the tests drive (as a real deployment's would be).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model build per test session (CI's cache folder is fresh each run)."""
    shared = os.environ.get("SDBOT_TEST_CACHE_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def engine(model_cache: Path) -> Iterator[Engine]:
    """Shared across tests so the tiny model loads once; each bot gets its own GPU thread."""
    yield Engine(device="cpu", dtype="float32", cache_dir=model_cache)


@pytest.fixture
def settings(tmp_path: Path, model_cache: Path) -> Settings:
    return load_settings(
        _env_file=None,
        db_path=tmp_path / "sdbot.db",
        cache_dir=model_cache,
        device="cpu",
        default_model="builtin:tiny",
        discord_token=None,
        discord_api_base=None,
    )


@pytest.fixture
async def harness(settings: Settings, engine: Engine) -> AsyncIterator[Harness]:
    async with running_bot(settings, engine=engine) as h:
        yield h
