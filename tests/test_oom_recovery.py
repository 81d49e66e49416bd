"""Out-of-memory recovery that frees memory: injected OOMs on the real tiny model, through the
engine and the executor. Each retry must run outside the `except` block that caught the OOM
(`sys.exc_info()` is empty in it), and nothing may keep the failed call's tensors alive: not a
traceback, not an exception's cause, not the Failed event the user gets."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.backend import Failed
from bot.db import Database
from bot.engine import BUILTIN_TINY, Engine
from bot.errors import GpuOutOfMemory
from tests.test_executor import (  # noqa: F401  (db is a fixture)
    db,
    events_of,
    finished,
    gpu_held,
    origin,
    req,
    running,
    status,
)

# 64 MB: big enough to matter, small enough for CI; what the "activations" of a failed call are.
BIG = 16 * 2**20


class Oom:
    """Makes the tiny model's UNet run out of memory on calls of more than `max_rows` rows,
    after allocating a big tensor (the activations a real OOM leaves behind); records, for the
    calls that run, whether an exception was being handled and whether any big tensor of a
    failed call was still alive."""

    def __init__(self, unet: Any, max_rows: int) -> None:
        self.unet = unet
        self.max_rows = max_rows
        self.failed = 0
        self.big: list[weakref.ref[torch.Tensor]] = []
        self.handling: list[object] = []
        self.alive_at_retry: list[bool] = []
        self._original = unet.forward

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] > self.max_rows:
            activations = torch.ones(BIG)
            self.big.append(weakref.ref(activations))
            self.failed += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.handling.append(sys.exc_info()[1])
        self.alive_at_retry.append(any(ref() is not None for ref in self.big))
        return self._original(sample, *args, **kwargs)

    def dead(self) -> bool:
        gc.collect()
        return bool(self.big) and all(ref() is None for ref in self.big)


@pytest.fixture(scope="module")
def batched(model_cache: Path) -> Engine:
    # exact_batches off: the UNet sees the whole batch, as on CUDA, so batches can OOM.
    return Engine(device="cpu", dtype="float32", cache_dir=model_cache, exact_batches=False)


@pytest.fixture
def oom(batched: Engine) -> Iterator[Oom]:
    unet = batched.load(BUILTIN_TINY).unet
    fault = Oom(unet, max_rows=2)  # one image with guidance: 2 rows
    unet.forward = fault.forward
    try:
        yield fault
    finally:
        unet.__dict__.pop("forward", None)


def test_an_engine_oom_keeps_no_frames_or_tensors(batched: Engine, oom: Oom) -> None:
    with pytest.raises(GpuOutOfMemory) as info:
        batched.generate([req("two", count=2, seed=5)])
    error = info.value
    assert oom.failed == 1 and oom.dead()
    # Nothing chained whose traceback pins the failed call's frames; the detail is a note.
    assert error.__cause__ is None and error.__context__ is None
    assert error.__notes__ == ["OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "forward" not in frames and "denoise" not in frames


async def test_the_executor_retries_outside_the_handler_with_the_memory_freed(
    batched: Engine,
    oom: Oom,
    db: Database,  # noqa: F811
) -> None:
    async with running(batched, db, max_batch=4) as ex:  # type: ignore[arg-type]
        async with gpu_held(ex):
            pair = [await ex.submit(origin(u), req(f"pair {u}", seed=u)) for u in range(2)]
            multi = await ex.submit(origin(3), req("multi", seed=40, count=2))
        results = [await finished(job) for job in pair]
        split = await finished(multi)
    assert [r.seeds for r in results] == [[0], [1]] and split.seeds == [40, 41]
    # One batch of all 4 images, then halves: (pair 0) | (pair 1 + multi), then multi's images.
    assert oom.failed == 3
    # Every retried call ran with no exception being handled and the failed call's big
    # tensor already gone: the retries left the handler and the engine freed memory first.
    assert oom.handling and all(exc is None for exc in oom.handling)
    assert not any(oom.alive_at_retry)
    assert oom.dead()


async def test_a_failed_event_keeps_no_frames(
    batched: Engine,
    oom: Oom,
    db: Database,  # noqa: F811
) -> None:
    oom.max_rows = 0  # even one image runs out of memory
    async with running(batched, db) as ex:  # type: ignore[arg-type]
        job = await ex.submit(origin(1), req("huge"))
        event = (await events_of(job))[-1]
        assert await status(db, job) == "failed"
        row = await db.get_job(job.id)
    assert isinstance(event, Failed) and isinstance(event.error, GpuOutOfMemory)
    assert "even when it ran on its own" in event.error.message
    error = event.error
    assert error.__traceback__ is None and error.__cause__ is None and error.__context__ is None
    assert oom.dead()
    # The job row keeps the original error as text.
    assert row is not None and "OutOfMemoryError: CUDA out of memory" in str(row["error"])


def test_a_decode_oom_is_retried_tiled_without_denoising_again(
    batched: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = batched.load(BUILTIN_TINY)
    vae = pipe.vae
    reference = batched.generate([req("fox", seed=3)])[0].images[0]
    original = vae.decode
    calls: list[tuple[bool, object]] = []
    big: list[weakref.ref[torch.Tensor]] = []

    def decode(*args: Any, **kwargs: Any) -> Any:
        calls.append((bool(vae.use_tiling), sys.exc_info()[1]))
        if not vae.use_tiling:
            activations = torch.ones(BIG)
            big.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (decode)")
        assert big[0]() is None  # the failed decode's memory is gone before the retry
        return original(*args, **kwargs)

    unet_calls = 0
    unet_forward = pipe.unet.forward

    def count_unet(*args: Any, **kwargs: Any) -> Any:
        nonlocal unet_calls
        unet_calls += 1
        return unet_forward(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    monkeypatch.setattr(pipe.unet, "forward", count_unet)
    image = batched.generate([req("fox", seed=3)])[0].images[0]
    assert calls == [(False, None), (True, None)]
    assert unet_calls == 2  # 2 steps, denoised once: only the decode was retried
    assert not vae.use_tiling  # tiling was for that one decode
    # The tiny model's 64 px fits in one tile, so the tiled decode is the same image.
    assert image.tobytes() == reference.tobytes()
