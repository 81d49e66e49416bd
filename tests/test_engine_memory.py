"""Memory decides, and the GPU defaults: the dtype policy and the NaN guard, TF32, the allocator
setting, batch size and loaded models from free memory (an injected probe stands in for
CUDA's), the RAM tier and the shared safety checker, on the real tiny model."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bot.catalog import BUILTIN_TINY_XL
from bot.db import Database
from bot.engine import BUILTIN_TINY, Engine, LoadRecord
from bot.engine.device import enable_tf32, resolve_device, resolve_dtype
from bot.engine.engine import NO_BATCH_LIMIT
from bot.engine.memory import GB, MB, MemoryInfo, cuda_probe, module_bytes, pipeline_modules
from bot.executor.worker import Worker
from bot.tiny_xl import ensure_tiny_xl
from tests.test_engine_loading import files, make, new_engine  # noqa: F401  (files: a fixture)
from tests.test_executor import db, finished, gpu_held, origin, req, running  # noqa: F401

# -- dtype, TF32, allocator ------------------------------------------------------------------


@pytest.mark.parametrize(("major", "expected"), [(8, torch.bfloat16), (7, torch.float16)])
def test_auto_dtype_is_bf16_where_the_card_has_it_else_fp16(
    monkeypatch: pytest.MonkeyPatch, major: int, expected: torch.dtype
) -> None:
    asked: list[torch.device] = []

    def capability(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return major, 0

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    # Native bf16 only (Ampere and later: emulated bf16 is slow), of the engine's device.
    assert asked == [torch.device("cuda")]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_flags")
def test_tf32_is_switched_on_for_cuda_only() -> None:
    enable_tf32(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32
    enable_tf32(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize(("name", "index"), [("auto", 0), ("cuda", 0), ("cuda:1", 1)])
def test_a_cuda_device_always_has_an_index(
    monkeypatch: pytest.MonkeyPatch, name: str, index: int
) -> None:
    # torch.cuda.set_per_process_memory_fraction (and others) refuse a bare "cuda": seen on
    # an H200, where the bench's OOM row failed with it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here
    assert resolve_device(name) == torch.device("cuda", index)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "expandable_segments:True"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128"),
        ({"PYTORCH_ALLOC_CONF": "backend:native"}, None),
    ],
)
def test_expandable_segments_unless_the_user_set_the_allocator(
    env: dict[str, str], expected: str | None
) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF",)}
    clean.pop("PYTORCH_ALLOC_CONF", None)
    code = "import os, bot.engine; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(expected)


# -- the NaN guard ---------------------------------------------------------------------------


def test_a_nan_decode_is_decoded_again_in_fp32_and_logged_once(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(device="cpu", dtype="bfloat16", cache_dir=model_cache)
    vae = engine.load(BUILTIN_TINY).vae
    original = vae.decode
    dtypes: list[torch.dtype] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtypes.append(vae.dtype)
        out = original(latents, *args, **kwargs)
        if vae.dtype != torch.float32:  # the half-precision VAE overflows
            return (out[0] * float("nan"),)
        return out

    monkeypatch.setattr(vae, "decode", decode)
    with caplog.at_level(logging.WARNING, logger="bot.engine.decode"):
        images = engine.generate([make(BUILTIN_TINY, count=2, seed=7)])[0].images
        engine.generate([make(BUILTIN_TINY, seed=8)])
    assert dtypes == [torch.bfloat16, torch.float32] * 3
    assert vae.dtype == torch.bfloat16  # back to the model's dtype after the re-decode
    for image in images:
        pixels = np.asarray(image)
        assert pixels.std() > 0  # a real picture, not the black of a NaN decode
    warnings = [r for r in caplog.records if "NaN" in r.getMessage()]
    assert len(warnings) == 1 and "tiny" in warnings[0].getMessage()


def test_a_force_upcast_vae_is_cast_to_fp32_once_per_batch(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiny-xl's VAE says force_upcast, as SDXL's does: under fp16 it decodes in float32.
    engine = Engine(device="cpu", dtype="float16", cache_dir=model_cache)
    vae = engine.load(BUILTIN_TINY_XL).vae
    original_decode, original_to = vae.decode, torch.nn.Module.to
    dtypes: list[torch.dtype] = []
    casts: list[Any] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtypes.append(vae.dtype)
        return original_decode(latents, *args, **kwargs)

    def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if module is vae:
            casts.append(args[0] if args else kwargs)
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    [result] = engine.generate([make(BUILTIN_TINY_XL, count=3, seed=7, steps=2)])
    assert dtypes == [torch.float32] * 3  # each image decoded in float32
    assert casts == [torch.float32, torch.float16]  # there and back once, not per image
    assert vae.dtype == torch.float16
    assert all(np.asarray(image).std() > 0 for image in result.images)


# -- memory decides --------------------------------------------------------------------------


class FakeMemory:
    """A device of `total` bytes on which every loaded model takes `per_model` bytes."""

    def __init__(self, total: int, per_model: int) -> None:
        self.total = total
        self.per_model = per_model
        self.engine: Engine | None = None

    def __call__(self) -> MemoryInfo:
        loaded = len(self.engine.loaded_models) if self.engine is not None else 0
        return MemoryInfo(free=self.total - loaded * self.per_model, total=self.total)


def engine_on(model_cache: Path, files: Path, memory: FakeMemory, **kw: Any) -> Engine:  # noqa: F811
    engine = new_engine(model_cache, files, memory_probe=memory, **kw)
    memory.engine = engine
    return engine


def test_free_memory_decides_how_many_models_stay_loaded_below_the_ceiling(
    model_cache: Path,
    files: Path,  # noqa: F811
) -> None:
    # 16 GB, 5 GB a model, a 2 GB working margin: two fit with room to run, a third does not.
    memory = FakeMemory(total=16 * GB, per_model=5 * GB)
    engine = engine_on(model_cache, files, memory, max_loaded=4)
    for name in ("tiny", "copy", "checkpoint"):
        engine.load(name)
    assert engine.loaded_models == ["copy", "checkpoint"]
    # With room for all, the setting is the ceiling.
    roomy = engine_on(model_cache, files, FakeMemory(total=80 * GB, per_model=5 * GB), max_loaded=2)
    for name in ("tiny", "copy", "checkpoint"):
        roomy.load(name)
    assert roomy.loaded_models == ["copy", "checkpoint"]


def test_batch_limit_follows_free_memory_and_size(
    model_cache: Path,
    files: Path,  # noqa: F811
    engine: Engine,
) -> None:
    assert engine.batch_limit(make("tiny")) == NO_BATCH_LIMIT  # CPU: the settings decide
    memory = FakeMemory(total=24 * GB, per_model=4 * GB)
    small = engine_on(model_cache, files, memory)
    small.load("tiny")
    at_512 = small.batch_limit(make("tiny", width=512, height=512))
    at_1024 = small.batch_limit(make("tiny", width=1024, height=1024))
    assert at_512 > at_1024 >= 1
    assert small.batch_limit(make("tiny", width=512, height=512, guidance=1.0)) > at_512
    memory.total = 8 * GB  # 4 GB free after the model, as measured after the next run
    small.generate([make("tiny")])
    assert 1 <= small.batch_limit(make("tiny", width=512, height=512)) < at_512
    memory.total = 4 * GB + 100 * MB  # nothing to spare: still one image (OOM recovery's turn)
    small.models.residency.measure()
    assert small.batch_limit(make("tiny", width=1024, height=1024)) == 1
    assert small.memory_stats() == {"allocated_mb": 0.0, "reserved_mb": 0.0}


def test_batch_limit_knows_an_sdxl_model_the_catalog_does_not_say_is_one(
    model_cache: Path,
    files: Path,  # noqa: F811
) -> None:
    # Named by its folder, the model's family is only known once loaded; the SDXL estimate
    # applies then (smaller per latent pixel: SDXL has no attention at the top level).
    xl = str(ensure_tiny_xl(model_cache))
    limits = {}
    for model in ("tiny", xl):
        engine = engine_on(model_cache, files, FakeMemory(total=24 * GB, per_model=4 * GB))
        engine.load(model)
        limits[model] = engine.batch_limit(make(model, width=1024, height=1024))
    assert limits[xl] > limits["tiny"] >= 1


async def test_the_executor_keeps_batches_within_the_engine_limit(
    engine: Engine,
    db: Database,  # noqa: F811
) -> None:
    """A batch_limit of 2 under max_batch 4: jobs batch in pairs and a 3-image job runs as
    2 + 1 images, seeds kept; the images are those of an unlimited run."""

    class Limited:
        def __init__(self) -> None:
            self.calls: list[int] = []

        @property
        def loaded_models(self) -> list[str]:
            return engine.loaded_models

        def load(self, model: str) -> object:
            return engine.load(model)

        def batch_limit(self, request: Any) -> int:
            return 2

        def generate(self, requests: Any, *, on_step: Any = None) -> Any:
            self.calls.append(sum(r.count for r in requests))
            return engine.generate(requests, on_step=on_step)

    limited = Limited()
    assert Worker(limited).batch_limit(req()) == 2
    async with running(limited, db, max_batch=4) as ex:  # type: ignore[arg-type]
        async with gpu_held(ex):
            singles = [await ex.submit(origin(u), req(f"s{u}", seed=u)) for u in range(2)]
        for job in singles:
            await finished(job)
        triple = await finished(await ex.submit(origin(5), req("t", seed=30, count=3)))
    assert limited.calls == [2, 2, 1]
    assert triple.seeds == [30, 31, 32]


def test_the_ram_tier_switches_back_without_a_disk_load_within_its_budget(
    model_cache: Path,
    files: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = new_engine(model_cache, files)
    size = module_bytes(pipeline_modules(probe.load("tiny")))
    budget_mb = math.ceil(1.5 * size / MB)  # room for one tiny model, not two
    records: list[LoadRecord] = []
    engine = new_engine(
        model_cache, files, max_loaded=1, ram_cache_mb=budget_mb, on_load=records.append
    )
    disk_loads: list[str] = []
    load_pipeline = engine.models._load_pipeline

    def counted(entry: Any, kind: str, location: str) -> Any:
        disk_loads.append(entry.name)
        return load_pipeline(entry, kind, location)

    monkeypatch.setattr(engine.models, "_load_pipeline", counted)
    first = engine.generate([make("tiny")])[0].images[0]
    tiny_pipe = engine.load("tiny")
    engine.load("copy")  # tiny moves to RAM
    assert engine.loaded_models == ["copy"] and engine.models.residency.ram.names() == ["tiny"]
    again = engine.generate([make("tiny")])[0].images[0]  # a copy back, not a disk load
    assert disk_loads == ["tiny", "copy"]
    assert engine.load("tiny") is tiny_pipe and again.tobytes() == first.tobytes()
    assert [r.model for r in records] == ["tiny", "copy", "tiny"] and all(r.ok for r in records)
    # copy went to RAM when tiny came back; checkpoint moves tiny in, and copy out (budget).
    engine.load("checkpoint")
    assert engine.models.residency.ram.names() == ["tiny"]
    engine.load("copy")  # dropped from RAM by the budget: read from disk again
    assert disk_loads == ["tiny", "copy", "checkpoint", "copy"]
    assert engine.models.residency.ram.names() == ["checkpoint"]
    engine.unload()
    assert engine.loaded_models == [] and engine.models.residency.ram.names() == []


def tiny_checker() -> tuple[Any, Any]:
    """A random-weight StableDiffusionSafetyChecker and its feature extractor, in code."""
    # Lazy: diffusers and transformers take seconds to import; only this test needs them here.
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    extractor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return StableDiffusionSafetyChecker(config).eval(), extractor


def test_every_model_shares_one_safety_checker(
    model_cache: Path,
    files: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = new_engine(model_cache, files, max_loaded=2)
    load_pipeline = engine.models._load_pipeline

    def with_checker(entry: Any, kind: str, location: str) -> Any:
        pipe = load_pipeline(entry, kind, location)
        checker, extractor = tiny_checker()  # each model ships its own copy
        pipe.register_modules(safety_checker=checker, feature_extractor=extractor)
        return pipe

    monkeypatch.setattr(engine.models, "_load_pipeline", with_checker)
    tiny, copy = engine.load("tiny"), engine.load("copy")
    assert tiny.safety_checker is copy.safety_checker is engine.models.residency.safety_checker
    # The shared one judges every model's images, in every mode.
    result = engine.generate([make("copy")])[0]
    assert len(result.nsfw) == 1
    assert engine.pipeline("copy", "img2img").safety_checker is tiny.safety_checker


def test_the_cuda_probe_counts_torchs_cached_blocks_as_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GB, 16 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * GB)
    probe = cuda_probe(torch.device("cuda"))
    assert probe is not None and probe() == MemoryInfo(free=4 * GB, total=16 * GB)
    assert cuda_probe(torch.device("cpu")) is None
