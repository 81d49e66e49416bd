"""Model loading: single-file checkpoints, the LRU of loaded models, load records."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from bot.catalog import BUILTIN_TINY, BUILTIN_TINY_INPAINT, Catalog
from bot.engine import Engine, LoadRecord
from bot.errors import InvalidRequest, ModelLoadError
from bot.jobs import GenerationRequest
from bot.tiny_model import (
    TINY_MODEL_DIRNAME,
    ensure_tiny_model,
    write_config_folder,
    write_single_file,
)


@pytest.fixture(scope="module")
def files(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog with the tiny model as a checkpoint file (+ weightless config) and a copy."""
    root = tmp_path_factory.mktemp("models")
    tiny = ensure_tiny_model(model_cache)
    write_single_file(tiny, root / "tiny.safetensors")
    write_config_folder(tiny, root / "tiny-config")
    shutil.copytree(tiny, root / "copy")
    (root / "models.toml").write_text(
        f"""
[models.tiny]
source = "{BUILTIN_TINY}"
native_size = 64

[models.checkpoint]
source = "tiny.safetensors"
config = "tiny-config"
native_size = 64

[models.inpainting]
source = "{BUILTIN_TINY_INPAINT}"
native_size = 64

[models.copy]
source = "copy"
native_size = 64

[models.missing]
source = "does-not-exist/model.safetensors"
""",
        encoding="utf-8",
    )
    return root


def new_engine(model_cache: Path, files: Path, **kwargs: object) -> Engine:
    catalog = Catalog.load(files / "models.toml", files / "loras")
    return Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog, **kwargs)  # type: ignore[arg-type]


def make(model: str, **overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompt": "a red fox in snow",
        "model": model,
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 11,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def test_single_file_checkpoint_round_trip_offline(model_cache: Path, files: Path) -> None:
    """The tiny model written in the original single-file layout loads with from_single_file
    (configs from a weightless local folder, nothing fetched) and gives the same image."""
    assert not list((files / "tiny-config").rglob("*.safetensors"))
    engine = new_engine(model_cache, files, max_loaded=2)
    original = engine.load("tiny")
    checkpoint = engine.load("checkpoint")
    assert checkpoint is not original
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(checkpoint, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for mode in ("txt2img", "img2img"):
        extra: dict[str, object] = {}
        if mode == "img2img":
            from PIL import Image

            extra = {"mode": mode, "init_image": Image.new("RGB", (64, 64), (90, 140, 200))}
        want = engine.generate([make("tiny", **extra)])[0].images[0].tobytes()
        got = engine.generate([make("checkpoint", **extra)])[0].images[0].tobytes()
        assert got == want, mode


def test_single_file_errors_say_what_is_missing(
    model_cache: Path, files: Path, tmp_path: Path
) -> None:
    engine = new_engine(model_cache, files)
    with pytest.raises(ModelLoadError, match=r"checkpoint file of model `missing` does not"):
        engine.load("missing")
    bad_config = tmp_path / "models.toml"
    bad_config.write_text(
        f'[models.c]\nsource = "{files / "tiny.safetensors"}"\nconfig = "{tmp_path}"\n'
    )
    other = Engine(
        device="cpu",
        dtype="float32",
        cache_dir=model_cache,
        catalog=Catalog.load(bad_config, tmp_path),
    )
    with pytest.raises(ModelLoadError, match="is not a diffusers folder"):
        other.load("c")


def test_least_recently_used_model_is_evicted(model_cache: Path, files: Path) -> None:
    records: list[LoadRecord] = []
    engine = new_engine(model_cache, files, max_loaded=2, on_load=records.append)
    assert engine.loaded_models == []
    engine.load("tiny")
    engine.load("copy")
    assert engine.loaded_models == ["tiny", "copy"]
    engine.load("tiny")  # used again: now the most recent
    assert engine.loaded_models == ["copy", "tiny"]
    engine.load("inpainting")  # evicts "copy", the least recently used
    assert engine.loaded_models == ["tiny", "inpainting"]
    assert not engine.is_loaded("copy")
    assert engine.is_loaded("tiny") and engine.is_loaded(BUILTIN_TINY)  # a source finds it too
    assert engine.is_loaded("unknown-name") is False
    # Reloading an evicted model works and counts as a new load.
    engine.generate([make("copy")])
    assert engine.loaded_models == ["inpainting", "copy"]
    assert [(r.model, r.ok) for r in records] == [
        ("tiny", True),
        ("copy", True),
        ("inpainting", True),
        ("copy", True),
    ]


def test_load_records_for_ok_and_failed_loads(
    model_cache: Path, files: Path, tmp_path: Path
) -> None:
    records: list[LoadRecord] = []
    engine = new_engine(model_cache, files, on_load=records.append)
    engine.load("tiny")
    ok = records[-1]
    assert (ok.model, ok.source, ok.ok, ok.error) == ("tiny", BUILTIN_TINY, True, None)
    assert ok.seconds > 0
    assert ok.memory_mb is not None and 0.1 < ok.memory_mb < 50
    engine.load("tiny")  # already loaded: no new record
    assert len(records) == 1

    broken = tmp_path / "broken"
    shutil.copytree(model_cache / TINY_MODEL_DIRNAME, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        engine.load(str(broken))
    failed = records[-1]
    assert (failed.model, failed.source, failed.ok, failed.memory_mb) == (
        str(broken),
        str(broken),
        False,
        None,
    )
    # The record's error is the members' message: no path (the source column has it).
    assert failed.error is not None and "model `broken`" in failed.error
    assert str(tmp_path) not in failed.error
    with pytest.raises(ModelLoadError):
        engine.load("missing")
    assert records[-1].model == "missing" and not records[-1].ok

    # A failing callback never fails the load itself.
    def explode(record: LoadRecord) -> None:
        raise RuntimeError("database is gone")

    engine.on_load = explode
    assert engine.load("copy") is not None


def test_unknown_model_name_is_an_invalid_request(model_cache: Path, files: Path) -> None:
    engine = new_engine(model_cache, files)
    with pytest.raises(InvalidRequest, match=r"Unknown model 'tiyn'\. Available: tiny, checkpoint"):
        engine.load("tiyn")
    with pytest.raises(InvalidRequest, match="Unknown model"):
        engine.generate([make("tiyn")])


def test_max_loaded_must_be_positive(model_cache: Path) -> None:
    from bot.errors import SettingsError

    with pytest.raises(SettingsError, match="max_loaded must be at least 1"):
        Engine(device="cpu", cache_dir=model_cache, max_loaded=0)


BROKEN_SOURCES = {
    "gone": 'source = "./missing-folder"',
    "gone-checkpoint": 'source = "./missing.safetensors"',
    "corrupt": 'source = "corrupt.safetensors"',
    "corrupt-with-config": 'source = "corrupt.safetensors"\nconfig = "tiny-config"',
    "bad-config": 'source = "tiny.safetensors"\nconfig = "not-a-config"',
    "half-folder": 'source = "half-folder"',
    "no-index": 'source = "no-index"',
    "a-file": 'source = "weights.bin"',
}


@pytest.mark.parametrize("name", list(BROKEN_SOURCES))
def test_load_errors_name_the_model_never_the_servers_paths(
    model_cache: Path,
    files: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """What a member sees when a catalog model cannot load: its name, no path; the path goes
    to the log (and, for a missing file, to the cause the job's row records)."""
    root = tmp_path / "server models"  # a space: paths in diffusers' messages are cut there
    root.mkdir()
    (root / "corrupt.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0not json")
    shutil.copy(files / "tiny.safetensors", root / "tiny.safetensors")
    shutil.copytree(files / "tiny-config", root / "tiny-config")
    (root / "not-a-config").mkdir()
    shutil.copytree(model_cache / TINY_MODEL_DIRNAME, root / "half-folder")
    (root / "half-folder" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "no-index").mkdir()
    (root / "weights.bin").write_bytes(b"weights")
    (root / "models.toml").write_text(f"[models.{name}]\n{BROKEN_SOURCES[name]}\n")
    catalog = Catalog.load(root / "models.toml", root / "loras")
    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)
    with pytest.raises(ModelLoadError) as info:
        engine.load(name)
    message = info.value.message
    assert f"model `{name}`" in message
    for path in {str(tmp_path), str(tmp_path.resolve()), "server models", "/tmp"}:
        assert path not in message, message
    assert str(root) in caplog.text  # the owner still learns which file
    cause = info.value.__cause__
    if isinstance(cause, OSError) and cause.filename:  # refused before diffusers was asked
        assert str(root) in str(cause)


def test_paths_are_scrubbed_from_what_diffusers_and_the_os_say() -> None:
    from bot.engine.sources import public_error, scrub_paths

    cases = {
        "no file in directory /srv/sd/models/x/unet.": "no file in directory <path>",
        "for '/srv/a.safetensors' at \"/srv/a.safetensors\"": "for '<path>' at \"<path>\"",
        "C:\\Users\\me\\m.ckpt, ~/models/m and (/root/.cache/hf)": "<path>, <path> and (<path>)",
        # Not paths: Hub ids, URLs, relative paths, fractions.
        "see https://huggingface.co/a/b or owner/name, ./rel/x, 1/2": "unchanged",
    }
    for text, expected in cases.items():
        assert scrub_paths(text) == (text if expected == "unchanged" else expected)
    # A known path goes whole, spaces and all; what follows it stays.
    error = OSError("no unet in /srv/my models/sd15/unet")
    assert public_error(error, "/srv/my models/sd15") == "OSError: no unet in <path>/unet"
    started = time.perf_counter()
    scrub_paths("/" * 200_000 + "a/" * 200_000)
    assert time.perf_counter() - started < 0.5  # linear on any text


# -- Hub models that cannot load here: refused before anything is evicted ----------------------

HUB_CATALOG = """
[models.tiny]
source = "builtin:tiny"
native_size = 64

[models.remote]
source = "sdbot-test/not-downloaded"
"""


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache, so a model someone happens to have cached changes nothing."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def offline(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads the variable at import; the engine heeds it as set now too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if value else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", value)


def test_a_hub_model_not_downloaded_offline_leaves_the_loaded_model_loaded(
    model_cache: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline(monkeypatch, True)
    (tmp_path / "models.toml").write_text(HUB_CATALOG)
    catalog = Catalog.load(tmp_path / "models.toml", tmp_path / "loras")
    records: list[LoadRecord] = []
    engine = Engine(
        device="cpu",
        dtype="float32",
        cache_dir=model_cache,
        catalog=catalog,
        max_loaded=1,
        on_load=records.append,
    )
    pipe = engine.load("tiny")

    with pytest.raises(ModelLoadError) as info:
        engine.generate([make("remote")])
    # Not evicted, so not reloaded: the same pipeline, one successful load in all.
    assert engine.loaded_models == ["tiny"]
    assert engine.load("tiny") is pipe
    message = info.value.message
    assert message.startswith(
        "Model `remote` (`sdbot-test/not-downloaded`) is not downloaded yet and the Hugging "
        "Face Hub cannot be reached."
    )
    assert [(r.model, r.ok, r.error) for r in records] == [
        ("tiny", True, None),
        ("remote", False, message),
    ]
    # The fronts can tell before anyone picks it.
    assert engine.available("remote") == message
    assert engine.available("tiny") is None
    assert engine.generate([make("tiny")])[0].images[0].size == (64, 64)


def test_an_unreachable_hub_is_found_out_before_the_loaded_model_is_evicted(
    model_cache: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online as far as the settings say, but the Hub does not answer: its small index is
    asked for first, and that failure leaves the loaded model loaded."""
    import huggingface_hub

    offline(monkeypatch, False)
    asked: list[str] = []

    def no_route(repo_id: str, filename: str, **kwargs: object) -> str:
        asked.append(f"{repo_id}/{filename}")
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_route)
    (tmp_path / "models.toml").write_text(HUB_CATALOG)
    catalog = Catalog.load(tmp_path / "models.toml", tmp_path / "loras")
    engine = Engine(device="cpu", dtype="float32", cache_dir=model_cache, catalog=catalog)
    engine.load("tiny")
    assert engine.available("remote") is None  # for all it can tell offline: downloadable
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        engine.load("remote")
    assert asked == ["sdbot-test/not-downloaded/model_index.json"]
    assert engine.loaded_models == ["tiny"]
