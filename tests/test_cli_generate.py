"""`sdbot generate` and `sdbot tiny-model` from the shell, in-process, on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bot.cli import main
from bot.imaging import parse_parameters, read_parameters


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_cache: Path) -> Iterator[Path]:
    # No developer .env: run from an empty folder with explicit settings.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDBOT_CACHE_DIR", str(model_cache))
    monkeypatch.setenv("SDBOT_DEVICE", "cpu")
    monkeypatch.setenv("SDBOT_DEFAULT_MODEL", "builtin:tiny")
    monkeypatch.setenv("SDBOT_LORA_DIR", str(tmp_path / "loras"))
    monkeypatch.delenv("SDBOT_MODELS_FILE", raising=False)
    yield tmp_path


def params(path: Path) -> dict[str, str]:
    text = read_parameters(path.read_bytes())
    assert text is not None
    return parse_parameters(text)


def test_generate_one_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "fox.png"
    code = main(["generate", "a red fox", "-o", str(out), "--seed", "5", "--steps", "3",
                 "--scheduler", "euler a", "--negative", "blurry"])  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (64, 64)  # the catalog's native size for tiny
    found = params(out)
    assert found["prompt"] == "a red fox" and found["negative_prompt"] == "blurry"
    assert (found["Seed"], found["Sampler"], found["Steps"], found["Model"]) == (
        "5", "Euler a", "3", "tiny",
    )  # fmt: skip
    assert "wrote" in capsys.readouterr().out


def test_generate_count_writes_grid_and_each_image(tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    assert main(["generate", "a cat", "-o", str(out), "--count", "3", "--seed", "9",
                 "--steps", "2", "--width", "72", "--height", "64"]) == 0  # fmt: skip
    assert Image.open(out).size == (216, 64)  # 1 row x 3, as A1111
    assert params(out)["Seed"] == "9"
    for i, seed in enumerate((9, 10, 11), start=1):
        single = tmp_path / f"many-{i}.png"
        assert Image.open(single).size == (72, 64)
        assert params(single)["Seed"] == str(seed)


def test_generate_img2img_and_inpaint_from_files(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (128, 96), (200, 120, 40)).save(photo)
    out = tmp_path / "vary.png"
    assert main(["generate", "a cat", "-o", str(out), "--image", str(photo),
                 "--strength", "0.5", "--steps", "4"]) == 0  # fmt: skip
    # The native 64 (tiny's), no side under the 64 minimum...
    assert Image.open(out).size == (64, 64)
    assert params(out)["Denoising strength"] == "0.5"
    # ...and with one side given, the other keeps the photo's aspect.
    assert main(["generate", "a cat", "-o", str(out), "--image", str(photo), "--width", "128",
                 "--steps", "2"]) == 0  # fmt: skip
    assert Image.open(out).size == (128, 96)

    mask = tmp_path / "mask.png"
    m = Image.new("L", (128, 96), 0)
    m.paste(255, (0, 0, 64, 96))
    m.save(mask)
    out = tmp_path / "fixed.png"
    assert main(["generate", "a dog", "-o", str(out), "--image", str(photo), "--mask", str(mask),
                 "--steps", "4", "--width", "128", "--height", "96"]) == 0  # fmt: skip
    assert Image.open(out).size == (128, 96)

    # Inpaint from an image's transparent pixels, no separate mask.
    clear = tmp_path / "clear.png"
    rgba = Image.new("RGBA", (64, 64), (10, 200, 10, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 64))
    rgba.save(clear)
    assert main(["generate", "grass", "-o", str(tmp_path / "c.png"), "--mode", "inpaint",
                 "--image", str(clear), "--steps", "4"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "Euler b"], "Unknown scheduler 'Euler b'"),
        (["--model", "nosuchmodel"], "Unknown model 'nosuchmodel'. Available: tiny"),
        (["--lora", "ink:heavy"], "the weight after ':' must be a number"),
        (["--lora", "ink:0.5"], "Unknown LoRA 'ink': no LoRAs are installed"),
        (["--mode", "img2img"], "--mode img2img needs --image FILE"),
        (["--image", "missing.png"], "Cannot read missing.png"),
        (["--count", "9"], "count 9 is out of range"),
    ],
)
def test_generate_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["generate", "x", "-o", str(tmp_path / "x.png"), "--steps", "2", *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sdbot: ") and message in err[-1]
    assert not (tmp_path / "x.png").exists()


def test_generate_refuses_a_non_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"hello")
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--image", str(bad)]) == 2
    assert "not an image sdbot can read" in capsys.readouterr().err


def test_tiny_model_with_checkpoint_then_generate_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["tiny-model", str(tmp_path / "tiny"), "--checkpoint",
                 str(tmp_path / "tiny.safetensors")]) == 0  # fmt: skip
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert (tmp_path / "tiny.safetensors.config" / "model_index.json").is_file()
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        '[models.file]\nsource = "tiny.safetensors"\nconfig = "tiny.safetensors.config"\n'
        "native_size = 64\n"
    )
    out = tmp_path / "from-file.png"
    reference = tmp_path / "reference.png"
    common = ["--seed", "3", "--steps", "3"]
    assert main(["generate", "a fox", "-o", str(reference), *common]) == 0
    monkeypatch.setenv("SDBOT_MODELS_FILE", str(catalog))
    assert main(["generate", "a fox", "-o", str(out), "--model", "file", *common]) == 0
    # The same weights through the single-file path: the same pixels.
    assert Image.open(out).tobytes() == Image.open(reference).tobytes()
    assert params(out)["Model"] == "file"
