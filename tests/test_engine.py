"""Engine tests on real diffusers pipelines with the tiny offline model (no mocks)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bot.engine.engine as engine_module
from bot.engine import BUILTIN_TINY, Engine, StepInfo
from bot.engine.device import is_oom
from bot.errors import GenerationFailed, GpuOutOfMemory, JobCancelled, ModelLoadError
from bot.jobs import GenerationRequest
from bot.tiny_model import TINY_MODEL_DIRNAME, ensure_tiny_model, write_tiny_model

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model-cache")
    ensure_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def engine(cache_dir: Path) -> Engine:
    # CPU + float32 explicitly so results do not depend on the machine running the tests.
    return Engine(device="cpu", dtype="float32", cache_dir=cache_dir)


def make_request(**overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompt": "a red fox in snow",
        "model": BUILTIN_TINY,
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance": 7.0,
        "seed": 1234,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def images_of(engine: Engine, request: GenerationRequest) -> list[Image.Image]:
    return engine.generate([request])[0].images


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def test_tiny_model_folder_layout_and_loads(cache_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = cache_dir / TINY_MODEL_DIRNAME
    assert (folder / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert (folder / UNET_WEIGHTS).is_file()
    # No temp dirs left behind by the atomic build.
    assert [p.name for p in cache_dir.iterdir()] == [TINY_MODEL_DIRNAME]

    pipeline_cls: Any = StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(str(folder), local_files_only=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("the cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) > 3


def test_ensure_tiny_model_reuses_existing_build(cache_dir: Path) -> None:
    folder = cache_dir / TINY_MODEL_DIRNAME
    marker = folder / "reuse-marker"
    marker.write_text("x")
    before = (folder / UNET_WEIGHTS).stat().st_mtime_ns
    try:
        assert ensure_tiny_model(cache_dir) == folder
        assert marker.exists()
        assert (folder / UNET_WEIGHTS).stat().st_mtime_ns == before
    finally:
        marker.unlink()


def test_ensure_tiny_model_replaces_incomplete_folder(tmp_path: Path) -> None:
    broken = tmp_path / TINY_MODEL_DIRNAME
    (broken / "unet").mkdir(parents=True)
    folder = ensure_tiny_model(tmp_path)
    assert (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY_MODEL_DIRNAME]


def test_write_tiny_model_is_deterministic(cache_dir: Path, tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "again")
    first = load_file(str(cache_dir / TINY_MODEL_DIRNAME / UNET_WEIGHTS))
    second = load_file(str(tmp_path / "again" / UNET_WEIGHTS))
    assert first.keys() == second.keys()
    assert all(first[k].equal(second[k]) for k in first)
    assert (cache_dir / TINY_MODEL_DIRNAME / UNET_WEIGHTS).read_bytes() == (
        tmp_path / "again" / UNET_WEIGHTS
    ).read_bytes()


def test_native_size(engine: Engine) -> None:
    assert engine.native_size(BUILTIN_TINY) == (64, 64)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64)])
def test_txt2img_returns_one_rgb_image_of_requested_size(
    engine: Engine, width: int, height: int
) -> None:
    images = images_of(engine, make_request(width=width, height=height))
    assert len(images) == 1
    image = images[0]
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (width, height)
    # Random weights must still give a real picture, not a flat or NaN-black one.
    assert np.asarray(image).std() > 1.0


def test_same_seed_gives_identical_pixels(engine: Engine) -> None:
    first = images_of(engine, make_request(seed=7))[0]
    second = images_of(engine, make_request(seed=7))[0]
    assert pixels(first) == pixels(second)


def test_different_seed_gives_different_image(engine: Engine) -> None:
    first = images_of(engine, make_request(seed=7))[0]
    second = images_of(engine, make_request(seed=8))[0]
    assert pixels(first) != pixels(second)


def test_negative_prompt_changes_image(engine: Engine) -> None:
    plain = images_of(engine, make_request())[0]
    negative = images_of(engine, make_request(negative_prompt="blurry, low quality"))[0]
    assert pixels(plain) != pixels(negative)


def test_on_step_reports_each_step(engine: Engine) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(
        [make_request(steps=3)], on_step=lambda info: calls.append((info.step, info.total))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_cancel_from_on_step_propagates_and_engine_keeps_working(
    engine: Engine,
) -> None:
    calls: list[int] = []

    def cancel_at_two(info: StepInfo) -> None:
        calls.append(info.step)
        if info.step == 2:
            raise JobCancelled("Cancelled by its owner.")

    with pytest.raises(JobCancelled):
        engine.generate([make_request(steps=4)], on_step=cancel_at_two)
    assert calls == [1, 2]

    # The next job must be unaffected by the aborted one (same pixels as a fresh run).
    after = images_of(engine, make_request(seed=99))[0]
    again = images_of(engine, make_request(seed=99))[0]
    assert pixels(after) == pixels(again)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), GpuOutOfMemory),
        (RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"), GpuOutOfMemory),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), GenerationFailed),
    ],
)
def test_a_failed_run_frees_memory_then_raises_the_bots_error(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    expected: type[GenerationFailed],
) -> None:
    """The executor only checks isinstance(exc, GpuOutOfMemory) and frees nothing itself."""
    freed: list[torch.device] = []
    monkeypatch.setattr(engine_module, "free_memory", freed.append)
    unet = engine.load(BUILTIN_TINY).unet

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    unet.forward = fail
    try:
        with pytest.raises(GenerationFailed) as info:
            engine.generate([make_request(count=2)])
    finally:
        # A batched run on CPU wraps (then deletes) forward itself; drop ours if still there.
        unet.__dict__.pop("forward", None)
    assert type(info.value) is expected
    # The original survives as a note only: no cause or context whose frames pin memory.
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert info.value.__notes__ == [f"{type(error).__name__}: {error}"]
    assert error.__traceback__ is None
    if expected is GpuOutOfMemory:
        assert info.value.message == (
            "Ran out of GPU memory making 2 image(s) at 64x64; try fewer images or a smaller size."
        )
    assert freed == [engine.device]
    assert images_of(engine, make_request())[0].size == (64, 64)


def test_is_oom_knows_torchs_ways_of_saying_it() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("MPS backend out of memory"))
    assert not is_oom(RuntimeError("expected scalar type Float"))
    assert not is_oom(MemoryError())


def test_missing_local_path_raises_model_load_error(engine: Engine, tmp_path: Path) -> None:
    engine.load(BUILTIN_TINY)
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError) as info:
        engine.load(str(missing))
    # Named by its last part only: members must not see the server's paths (the log does).
    assert "model `model` does not exist" in info.value.message
    assert str(tmp_path) not in info.value.message
    # A typo in a source is caught before the loaded model is thrown away.
    assert engine.loaded_source == BUILTIN_TINY


def test_broken_model_folder_raises_model_load_error(
    engine: Engine, cache_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir / TINY_MODEL_DIRNAME, broken)
    (broken / UNET_WEIGHTS).unlink()
    with pytest.raises(ModelLoadError) as info:
        engine.load(str(broken))
    assert "model folder of model `broken`" in info.value.message
    assert str(tmp_path) not in info.value.message
    assert engine.loaded_source is None


def test_folder_without_model_index_raises(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        engine.load(str(tmp_path))


def test_broken_single_file_checkpoint_raises_model_load_error(
    engine: Engine, tmp_path: Path
) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="Could not load the checkpoint") as info:
        engine.load(str(ckpt))
    assert "model `model.safetensors`" in info.value.message
    assert str(tmp_path) not in info.value.message
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.load(str(tmp_path / "missing.safetensors"))


def test_hub_id_offline_raises_helpful_model_load_error(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the env var at import time, so patch the parsed value as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # An empty hub cache, so a model someone happens to have cached cannot make this pass.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("sdbot-test/does-not-exist")

    with pytest.raises(ModelLoadError) as info:
        engine.load("sdbot-test/does-not-exist")
    message = info.value.message
    assert "sdbot-test/does-not-exist" in message
    assert "internet" in message
    assert "local folder" in message

    # A failed load leaves the engine usable.
    assert images_of(engine, make_request())[0].size == (64, 64)


# -- the engine's own safety checker ------------------------------------------------------------


def test_one_safety_checker_judges_the_images_of_every_model(model_cache: Path) -> None:
    """`Engine(safety_checker=...)` sees each batch's decoded images once, whatever the model
    (the tiny ones have no checker of their own), and its verdicts come with the images."""
    from bot.catalog import BUILTIN_TINY_INPAINT

    seen: list[list[bytes]] = []

    def every_other(images: list[Image.Image]) -> list[bool]:
        seen.append([pixels(image) for image in images])
        return [i % 2 == 0 for i in range(len(images))]

    engine = Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, safety_checker=every_other
    )
    for model in (BUILTIN_TINY, BUILTIN_TINY_INPAINT):
        result = engine.generate([make_request(model=model, count=3)])[0]
        assert result.nsfw == [True, False, True]
        assert seen[-1] == [pixels(image) for image in result.images]  # unaltered, in order
    assert len(seen) == 2
    # Without one, a model without its own checker flags nothing; the images are the same.
    plain = Engine(device="cpu", dtype="float32", cache_dir=model_cache)
    result = plain.generate([make_request(count=3)])[0]
    assert result.nsfw == [False, False, False]
    assert [pixels(image) for image in result.images] == seen[0]


@pytest.mark.parametrize("verdicts", ["raises", "too few"])
def test_a_failing_safety_checker_fails_the_job_rather_than_pass_an_image(
    model_cache: Path, verdicts: str
) -> None:
    def broken(images: list[Image.Image]) -> list[bool]:
        if verdicts == "raises":
            raise RuntimeError("classifier weights missing")
        return [False] * (len(images) - 1)

    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache, safety_checker=broken)
    with pytest.raises(GenerationFailed, match="Image generation failed unexpectedly"):
        engine.generate([make_request(count=2)])
    engine.safety_checker = None  # settable; the engine stays usable
    assert engine.generate([make_request(count=2)])[0].nsfw == [False, False]
