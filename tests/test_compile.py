"""Opt-in torch.compile (bot/engine/compile.py) on the tiny model, on CPU.

The graphs are compiled with the "aot_eager" backend: the same dynamo capture, guards,
recompiles and AOT autograd graphs as "inductor", without inductor's C++ code generation,
which takes minutes per graph on a CI runner's two cores (`sdbot bench gpu` measures inductor).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.catalog import Catalog
from bot.engine import Engine
from bot.engine.compile import Compiler
from bot.jobs import GenerationRequest, LoraSpec
from bot.tiny_model import ensure_tiny_model
from tests.test_engine_lora import write_tiny_lora

BUCKET = (64, 64)


@pytest.fixture(scope="module")
def lora_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compile-loras")
    write_tiny_lora(ensure_tiny_model(model_cache), folder / "ink.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def engines(model_cache: Path, lora_dir: Path) -> tuple[Engine, Engine]:
    """(eager, compiled) engines on the tiny model; the compiled one for the 64x64 bucket."""
    catalog = Catalog.load(None, lora_dir)
    eager = Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)
    compiled = Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)
    compiled.compiler = Compiler(backend="aot_eager", buckets=[BUCKET])
    return eager, compiled


def request(**overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompt": "a fox",
        "model": "tiny",
        "width": BUCKET[0],
        "height": BUCKET[1],
        "steps": 3,
        "seed": 11,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def image(engine: Engine, req: GenerationRequest) -> Image.Image:
    return engine.generate([req])[0].images[0]


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_engine_compile_setting_makes_a_compiler(model_cache: Path) -> None:
    assert Engine(device="cpu", cache_dir=model_cache, compile=True).compiler is not None
    assert Engine(device="cpu", cache_dir=model_cache).compiler is None


def test_compiled_model_gives_the_eager_image_and_compiles_once_per_shape(
    engines: tuple[Engine, Engine],
) -> None:
    eager, compiled = engines
    want = image(eager, request())
    first = image(compiled, request())
    pipe = compiled.load("tiny")
    compiler = compiled.compiler
    assert compiler is not None
    # The warm-up and the first call made the UNet's and the decoder's graphs for the bucket.
    graphs = compiler.graphs(pipe)
    assert graphs == 2
    # channels_last and the captured graph change summation orders: equal up to rounding.
    assert max_difference(want, first) <= 2
    captured = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    calls_before, eager_before = compiler.calls(pipe)
    again = image(compiled, request())
    # A second call at the same size: no new graph, in our count or dynamo's, and every UNet
    # and decoder call ran compiled (3 steps + 1 decode).
    assert compiler.graphs(pipe) == graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == captured
    assert compiler.calls(pipe) == (calls_before + 4, eager_before)
    assert again.tobytes() == first.tobytes()


def test_a_size_outside_the_buckets_runs_eager(engines: tuple[Engine, Engine]) -> None:
    eager, compiled = engines
    off = request(width=72, height=64)
    want = image(eager, off)
    compiler = compiled.compiler
    assert compiler is not None
    got = image(compiled, off)  # prepares the model first, if this test runs alone
    pipe = compiled.load("tiny")
    graphs = compiler.graphs(pipe)
    calls, eagers = compiler.calls(pipe)
    got = image(compiled, off)
    assert compiler.graphs(pipe) == graphs
    assert compiler.calls(pipe) == (calls, eagers + 4)
    assert got.size == (72, 64)
    # Eager modules in channels_last: equal up to rounding.
    assert max_difference(want, got) <= 2


def test_exact_batches_run_through_the_compiled_unet_and_leave_it_in_place(
    engines: tuple[Engine, Engine],
) -> None:
    eager, compiled = engines
    assert compiled.exact_batches  # on CPU: the UNet runs once per image of the batch
    pair = request(count=2, seed=40)
    want = eager.generate([pair])[0].images
    compiler = compiled.compiler
    assert compiler is not None
    got = compiled.generate([pair])[0].images
    pipe = compiled.load("tiny")
    calls, eagers = compiler.calls(pipe)
    again = compiled.generate([pair])[0].images
    # Per image: 3 steps of the UNet plus one decode, all through the dispatcher, which the
    # exact-batches wrapper put back after the call.
    assert compiler.calls(pipe) == (calls + 2 * 4, eagers)
    assert [a.tobytes() for a in again] == [g.tobytes() for g in got]
    assert all(max_difference(w, g) <= 2 for w, g in zip(want, got, strict=True))


def test_a_lora_call_runs_eager_and_leaves_the_compiled_graph_working(
    engines: tuple[Engine, Engine],
) -> None:
    eager, compiled = engines
    plain = image(compiled, request())
    compiler = compiled.compiler
    assert compiler is not None
    pipe = compiled.load("tiny")
    with_lora = request(loras=(LoraSpec("ink", 1.0),))
    calls, eagers = compiler.calls(pipe)
    styled = image(compiled, with_lora)
    # LoRA layers are in the UNet: its calls go eager (the decoder has none, and stays
    # compiled), and the LoRA does change the image, as it does without compile.
    assert compiler.calls(pipe) == (calls + 1, eagers + 3)
    assert max_difference(styled, image(eager, with_lora)) <= 2
    assert max_difference(styled, plain) > 2
    # Without the LoRA, the image is the plain one again.
    assert max_difference(image(compiled, request()), plain) <= 2


def test_an_evicted_compiled_model_is_freed(model_cache: Path) -> None:
    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache)
    engine.compiler = Compiler(backend="aot_eager", buckets=[BUCKET])
    image(engine, request())
    unet = weakref.ref(engine.load("tiny").unet)
    engine.unload()
    gc.collect()
    # Neither the compiler nor dynamo's compiled code keeps the weights alive.
    assert unet() is None
