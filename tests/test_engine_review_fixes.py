"""Review fixes of the GPU fast path (issue 12), on the CPU with the real tiny models.

A compile that fails falls back to eager for good; SDXL and checker-less models are checked by
the shared safety checker; a failed move to the device and a failed GPU-thread call keep no
frames; the RAM tier counts pinned sizes as torch's host allocator rounds them and gives pinned
blocks back; the compile warm-up makes the graphs members use; the bf16 choice, the compile
buckets and batch_limit's model lookup are the engine's device's and model's. CUDA-only paths
are driven by monkeypatching what torch would report on a GPU.
"""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bot import catalog as catalog_module
from bot.catalog import ModelEntry
from bot.db import Database
from bot.engine import Engine, loading
from bot.engine.compile import Compiler, _parts
from bot.engine.device import resolve_dtype
from bot.engine.memory import MemoryInfo, pinned_bytes
from bot.engine.patching import patched
from bot.engine.residency import Residency
from bot.errors import ModelLoadError
from bot.jobs import GenerationRequest
from bot.tiny_model import ensure_tiny_model
from tests.test_executor import db, running  # noqa: F401  (db is a fixture)


def request(model: str = "tiny", **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a fox",
        "model": model,
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 11,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def cpu_engine(model_cache: Path, **options: Any) -> Engine:
    return Engine(device="cpu", dtype="float32", cache_dir=model_cache, **options)


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# -- a compile that fails ---------------------------------------------------------------------


def test_a_failed_compile_runs_eager_from_then_on(model_cache: Path) -> None:
    attempts: list[int] = []

    def broken_backend(graph: Any, example_inputs: Any) -> Any:
        attempts.append(1)
        raise RuntimeError("injected: no C compiler")

    want = cpu_engine(model_cache).generate([request()])[0].images[0]
    engine = cpu_engine(model_cache)
    engine.compiler = Compiler(backend=broken_backend, buckets=[(64, 64)], warm_up=False)
    first = engine.generate([request()])[0].images[0]
    tried = len(attempts)
    second = engine.generate([request()])[0].images[0]
    pipe = engine.load("tiny")
    # The failed compile was tried once per module, never again; no graph was counted, and
    # every call ran the plain modules (3 UNet steps + 1 decode per generate).
    assert tried >= 1
    assert len(attempts) == tried
    assert engine.compiler.graphs(pipe) == 0
    assert engine.compiler.calls(pipe) == (0, 8)
    assert max_difference(want, first) <= 2  # channels_last: equal up to rounding
    assert first.tobytes() == second.tobytes()


def test_the_warm_up_uses_the_models_default_guidance(model_cache: Path) -> None:
    engine = cpu_engine(model_cache)
    engine.compiler = Compiler(backend="aot_eager", buckets=[(64, 64)])
    pipe = engine.load("tiny-turbo")  # guidance 0 by default: CFG off, one UNet row per image
    unet, decoder = _parts(pipe)
    assert {shape[0] for shape, _, _ in unet.graphs} == {1}
    assert {(shape, dtype) for shape, dtype, _ in decoder.graphs} == {((1, 4, 8, 8), torch.float32)}


def test_compile_buckets_take_a_height_width_sample_size() -> None:
    pipe = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=(8, 12))), vae_scale_factor=8
    )
    assert Compiler(warm_up=False).sizes(pipe) == [(96, 64)]


# -- the shared safety checker ----------------------------------------------------------------


class FlagEverything(torch.nn.Module):
    """Called like diffusers' StableDiffusionSafetyChecker; flags every image it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, images: Any, clip_input: torch.Tensor) -> tuple[Any, list[bool]]:
        self.inputs.append(tuple(clip_input.shape))
        return images, [True] * len(images)


def test_sdxl_and_checker_less_models_use_the_shared_checker(model_cache: Path) -> None:
    from transformers import CLIPImageProcessor

    engine = cpu_engine(model_cache)
    assert engine.generate([request("tiny-xl")])[0].nsfw == [False]  # nothing to check with yet
    checker = FlagEverything()
    extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    # As a model that ships a checker gives it: the checker and its feature extractor.
    engine.models.residency.share_checker(
        SimpleNamespace(safety_checker=checker, feature_extractor=extractor)
    )
    assert engine.models.residency.feature_extractor is extractor
    assert engine.generate([request("tiny-xl", count=2)])[0].nsfw == [True, True]
    assert engine.generate([request("tiny")])[0].nsfw == [True]
    assert checker.inputs == [(2, 3, 32, 32), (1, 3, 32, 32)]
    engine.unload()  # everything, the shared checker too
    assert engine.generate([request("tiny-xl")])[0].nsfw == [False]


# -- no frames kept ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "does not fit"),
        (RuntimeError("CUDA error: an illegal memory access"), "could not be moved"),
    ],
)
def test_a_failed_move_to_the_device_keeps_no_frames(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, message: str
) -> None:
    pipes: list[weakref.ref[Any]] = []
    real = loading._from_pretrained

    def failing_move(*args: Any, **kwargs: Any) -> Any:
        raise error

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        pipe.to = failing_move
        pipes.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(loading, "_from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError) as info:
        cpu_engine(model_cache).load("tiny")
    assert message in info.value.message
    # Raised outside the handler, with nothing chained: no frame holds the half-moved model.
    assert info.value.__cause__ is None and info.value.__context__ is None
    gc.collect()
    assert pipes and pipes[0]() is None


class Payload:
    """Stands for the tensors a failed GPU-thread call had."""


async def test_a_failed_gpu_thread_call_keeps_no_frames(
    engine: Engine,
    db: Database,  # noqa: F811
) -> None:
    payloads: list[weakref.ref[Payload]] = []

    def fails() -> None:
        payload = Payload()
        payloads.append(weakref.ref(payload))
        raise RuntimeError("injected")

    async with running(engine, db) as ex:  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="injected") as info:
            await ex.run_on_gpu_thread(fails)
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "fails" not in frames
    gc.collect()
    assert payloads[0]() is None


# -- the RAM tier -----------------------------------------------------------------------------


def fake_model(rows: int, columns: int) -> Any:
    return SimpleNamespace(
        base=SimpleNamespace(components={"unet": torch.nn.Linear(columns, rows)})
    )


def test_pinned_sizes_are_counted_as_the_host_allocator_rounds_them() -> None:
    assert [pinned_bytes(n) for n in (0, 1, 1000, 1024, 1025)] == [0, 1, 1024, 1024, 2048]


@pytest.mark.parametrize(("budget_mb", "kept"), [(3, False), (5, True)])
def test_the_ram_tier_budget_counts_pinned_sizes_and_pinned_ram_is_given_back(
    monkeypatch: pytest.MonkeyPatch, budget_mb: int, kept: bool
) -> None:
    emptied: list[int] = []
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append(1), raising=False)
    # A CUDA engine's residency (nothing here touches the GPU: the model is on the CPU).
    residency = Residency(device=torch.device("cuda"), ram_cache_mb=budget_mb, probe=None)
    model = fake_model(600, 1000)  # 2.4 MB of weights: 4 MB once pinned (and 4 KB of bias)
    residency.loaded("a", model.base)
    models: OrderedDict[str, Any] = OrderedDict(a=model)
    residency.make_room(models, "b", ceiling=1)
    assert not models
    assert ("a" in residency.ram) is kept
    if kept:
        assert residency.ram.used == 4 * 2**20 + 4096
    assert not emptied  # nothing was pinned and dropped
    assert residency.forget("a") is kept
    assert bool(emptied) is kept


PINNED_MODEL = 4 * 2**20 + 4096  # fake_model(600, 1000) pinned: 4 MB weight, 4 KB bias


@pytest.mark.parametrize(("budget_mb", "spare_kept"), [(10, True), (6, False)])
def test_switching_back_and_forth_reuses_the_pinned_blocks_within_the_budget(
    monkeypatch: pytest.MonkeyPatch, budget_mb: int, spare_kept: bool
) -> None:
    """Pinning RAM costs about half a second per GB (an H200 pinned 2 GiB in 0.85 s) and a
    collection a third of a second: a switch back leaves its pinned blocks for the next
    eviction, within the budget, and collects nothing."""
    emptied: list[int] = []
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append(1), raising=False)
    moves: list[str] = []
    monkeypatch.setattr(  # the copies themselves need a GPU
        "bot.engine.residency.move_modules",
        lambda pipe, device, skip=None: moves.append(device.type),
    )
    collections: list[torch.device] = []
    monkeypatch.setattr("bot.engine.residency.free_memory", collections.append)
    residency = Residency(device=torch.device("cuda"), ram_cache_mb=budget_mb, probe=None)
    a, b = fake_model(600, 1000), fake_model(600, 1000)
    residency.loaded("a", a.base)
    models: OrderedDict[str, Any] = OrderedDict(a=a)
    residency.make_room(models, "b", ceiling=1)  # a to RAM
    models["b"] = b
    for back, other in (("a", "b"), ("b", "a"), ("a", "b")):
        models[back] = residency.restore(models, ModelEntry(name=back, source=back), ceiling=1)
        assert list(models) == [back] and residency.ram.names() == [other]
        assert residency.ram.used == PINNED_MODEL
        assert residency.ram.used + residency.ram.spare <= budget_mb * 2**20
    assert moves == ["cpu", *["cpu", "cuda"] * 3]
    assert not collections
    # Within 10 MB the blocks the model going back left stay pinned, never given back; in
    # 6 MB they would break the budget, so they go back after each switch.
    assert residency.ram.spare == (PINNED_MODEL if spare_kept else 0)
    assert len(emptied) == (0 if spare_kept else 3)
    residency.forget(None)
    assert residency.ram.spare == 0 and not residency.ram.names()
    assert len(emptied) == (1 if spare_kept else 4)


# -- the device's, the model's --------------------------------------------------------------


def test_bf16_is_chosen_by_the_engines_device_not_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Device 0 (current) is pre-Ampere, the engine's device 1 is not.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)
    monkeypatch.setattr(torch.version, "hip", None)
    capability = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[d.index])
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float16


def test_batch_limit_reads_a_source_models_files_once(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(ensure_tiny_model(model_cache))
    probes: list[str] = []
    real = catalog_module.probe_native_size

    def probe(text: str) -> int:
        probes.append(text)
        return real(text)

    monkeypatch.setattr(catalog_module, "probe_native_size", probe)
    engine = cpu_engine(model_cache, memory_probe=lambda: MemoryInfo(free=8 * 2**30, total=2**34))
    engine.models.residency.measure()
    limits = {engine.batch_limit(request(source)) for _ in range(3)}
    assert len(limits) == 1 and limits.pop() >= 1
    assert probes == [source]


# -- the shared patch helper ------------------------------------------------------------------


def test_patched_puts_back_an_instance_attribute_and_removes_a_new_one() -> None:
    class Thing:
        def step(self) -> str:
            return "class"

    thing = Thing()
    with patched(thing, "step", lambda: "patched"):
        assert thing.step() == "patched"
    assert "step" not in vars(thing) and thing.step() == "class"
    thing.step = lambda: "own"  # type: ignore[method-assign]
    with pytest.raises(ValueError), patched(thing, "step", lambda: "patched"):
        raise ValueError
    assert thing.step() == "own"
