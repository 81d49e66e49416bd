"""`sdbot generate` and `sdbot tiny-model` from the shell, in-process, on the tiny model.

`sdbot generate` reads pictures, sizes, LoRAs and limits with the bot's own code, so the same
picture, prompt and seed give the same image as the Discord commands (checked against the real
bot on the local Discord server).
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import ExifTags, Image

import bot.engine
from bench.harness import Harness
from bot.cli import main
from bot.imaging import parse_parameters, read_parameters
from bot.inputs import DEFAULT_STRENGTH
from bot.tiny_model import ensure_tiny_model
from tests import images
from tests.test_engine_lora import write_tiny_lora


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
    # The photo's aspect, its short side at the native 64 (tiny's), as /img2img sizes it...
    assert Image.open(out).size == (80, 64)
    assert params(out)["Denoising strength"] == "0.5"
    # ...and an explicit size is kept, as Discord's size option is.
    assert main(["generate", "a cat", "-o", str(out), "--image", str(photo), "--size", "128x96",
                 "--steps", "2"]) == 0  # fmt: skip
    assert Image.open(out).size == (128, 96)
    assert params(out)["Denoising strength"] == "0.6"  # /img2img's default strength

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
        (["--lora", "ink:0.5"], "Unknown LoRA 'ink'. Available: none are installed"),
        (["--size", "big"], "size 'big' is not WIDTHxHEIGHT"),
        (["--width", "128"], "--width and --height go together"),
        (["--size", "64x64", "--width", "64", "--height", "64"], "not both"),
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


def exif_parameters(path: Path) -> dict[str, str]:
    """The parameters in a JPEG's or WebP's EXIF UserComment, as A1111 writes them (piexif's
    "unicode": an 8-byte charset prefix, then UTF-16BE)."""
    exif = Image.open(path).getexif().get_ifd(ExifTags.IFD.Exif)
    comment = exif[ExifTags.Base.UserComment]
    assert comment[:8] == b"UNICODE\0"
    return parse_parameters(comment[8:].decode("utf-16-be"))


@pytest.mark.parametrize(("name", "image_format"), [("fox.jpg", "JPEG"), ("fox.JPEG", "JPEG"),
                                                    ("fox.webp", "WEBP")])  # fmt: skip
def test_the_output_format_follows_the_extension(
    tmp_path: Path, name: str, image_format: str
) -> None:
    out = tmp_path / name
    assert main(["generate", "a red fox", "-o", str(out), "--seed", "5", "--steps", "2",
                 "--negative", "blurry"]) == 0  # fmt: skip
    with Image.open(out) as image:
        assert (image.format, image.size, image.mode) == (image_format, (64, 64), "RGB")
    found = exif_parameters(out)
    assert found["prompt"] == "a red fox" and found["negative_prompt"] == "blurry"
    assert (found["Seed"], found["Steps"], found["Model"]) == ("5", "2", "tiny")


def test_a_webp_grid_and_each_image_carry_their_parameters(tmp_path: Path) -> None:
    out = tmp_path / "cats.webp"
    assert main(["generate", "a cat", "-o", str(out), "--count", "2", "--seed", "9",
                 "--steps", "2"]) == 0  # fmt: skip
    assert Image.open(out).format == "WEBP" and Image.open(out).size == (128, 64)
    assert exif_parameters(out)["Seed"] == "9"
    for i, seed in enumerate((9, 10), start=1):
        single = tmp_path / f"cats-{i}.webp"
        assert Image.open(single).format == "WEBP" and Image.open(single).size == (64, 64)
        assert exif_parameters(single)["Seed"] == str(seed)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails a test that gets as far as building the engine: its -o was to be refused first."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the engine was built before the output path was checked")

    monkeypatch.setattr(bot.engine.Engine, "__init__", refuse)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{tmp}/", "is a folder; name a file in it, e.g. {tmp}/image.png"),
        ("{tmp}", "is a folder; name a file in it"),
        ("{tmp}/new/", "is a folder; name a file in it"),
        ("{tmp}/fox.gif", "the file name must end in .png, .jpg, .jpeg or .webp"),
        ("{tmp}/fox", "the file name must end in .png, .jpg, .jpeg or .webp"),
        ("{tmp}/notes.txt/fox.png", "notes.txt is a file, not a folder"),
        ("{tmp}/notes.txt/deeper/fox.png", "notes.txt is a file, not a folder"),
    ],
)
def test_a_bad_output_path_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None, output: str, message: str
) -> None:
    (tmp_path / "notes.txt").write_text("not a folder")
    code = main(["generate", "x", "-o", output.format(tmp=tmp_path), "--steps", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdbot: ")
    assert message.format(tmp=tmp_path) in err[0]
    assert not (tmp_path / "new").exists()


def test_a_grid_whose_image_file_is_a_folder_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    (tmp_path / "many-2.png").mkdir()
    assert main(["generate", "x", "-o", str(tmp_path / "many.png"), "--count", "3"]) == 2
    assert f"Cannot write {tmp_path / 'many-2.png'}: it is a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["generate", "x", "-o", str(locked / "x.png")]) == 2
    assert f"the folder {locked} is not writable" in capsys.readouterr().err


def test_a_bad_default_model_is_named_by_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SDBOT_DEFAULT_MODEL", "./models/missing")
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "invalid setting SDBOT_DEFAULT_MODEL: './models/missing' is not a model" in err
    # A model named on the command line does not need the default.
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--steps", "2",
                 "--model", "tiny"]) == 0  # fmt: skip


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


def test_loras_are_read_as_the_slash_commands_read_them(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loras = tmp_path / "loras"  # SDBOT_LORA_DIR
    loras.mkdir()
    model = ensure_tiny_model(model_cache)
    write_tiny_lora(model, loras / "ink.safetensors", seed=1)
    write_tiny_lora(model, loras / "paper.safetensors", seed=2)
    common = ["--seed", "4", "--steps", "2"]

    listed, repeated = tmp_path / "listed.png", tmp_path / "repeated.png"
    # As /imagine's lora option: a comma-separated list, a name ends at its first colon.
    assert main(["generate", "a fox", "-o", str(listed), "--lora", "ink:0.5, paper", *common]) == 0
    assert params(listed)["prompt"] == "a fox <lora:ink:0.5> <lora:paper:1>"
    assert main(["generate", "a fox", "-o", str(repeated), "--lora", "ink:0.5", "--lora", "paper",
                 *common]) == 0  # fmt: skip
    assert Image.open(listed).tobytes() == Image.open(repeated).tobytes()

    capsys.readouterr()
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--lora", "ink:heavy"]) == 2
    assert "LoRA weight 'heavy' for 'ink' is not a number" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--lora", "ink:0.5:1"]) == 2
    assert "LoRA weight '0.5:1' for 'ink' is not a number" in capsys.readouterr().err


def test_the_attachment_limit_counts_a_megabyte_as_2_to_the_20_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SDBOT_MAX_ATTACHMENT_MB", "1")
    data = images.photo((64, 64))

    def padded(size: int) -> Path:
        path = tmp_path / f"photo-{size}.png"
        path.write_bytes(data + b"\0" * (size - len(data)))  # bytes after IEND: still a PNG
        return path

    def generate(image: Path) -> int:
        return main(["generate", "x", "-o", str(tmp_path / "out.png"), "--image", str(image)])

    # Over 10**6 bytes, under 2**20: a Discord attachment of this size is accepted, so here too.
    assert generate(padded(1_040_000)) == 0
    assert generate(padded(2**20 + 1)) == 2
    assert "the limit is 1.0 MB" in capsys.readouterr().err


async def test_img2img_from_the_shell_gives_the_pixels_of_the_bots_img2img(
    harness: Harness, tmp_path: Path
) -> None:
    """The same 320x200 picture, prompt and seed, everything else left at its default:
    /img2img through the real bot and `sdbot generate --mode img2img --image` agree exactly."""
    picture = images.photo((320, 200))
    c = harness.control
    attachment = await c.upload(picture, "photo.png")
    sent = await c.slash("img2img", {"image": attachment["id"], "prompt": "night", "seed": 5})
    interaction_id = sent["interaction"]["id"]

    def is_result(message: dict[str, Any]) -> bool:
        return (
            message.get("interaction_metadata", {}).get("id") == interaction_id
            and "seed `" in message["content"]
            and any(a.get("content_type", "").startswith("image/") for a in message["attachments"])
        )

    result = await c.wait_for_message(is_result, timeout=90)
    from_discord = await c.download(result["attachments"][0])

    photo = tmp_path / "photo.png"
    photo.write_bytes(picture)
    out = tmp_path / "night.png"
    argv = ["generate", "night", "-o", str(out), "--mode", "img2img", "--image", str(photo),
            "--seed", "5"]  # fmt: skip
    # Off the event loop: the bot keeps serving its gateway while the shell command runs.
    assert await asyncio.to_thread(main, argv) == 0
    from_shell = out.read_bytes()

    discord_image = Image.open(io.BytesIO(from_discord))
    shell_image = Image.open(io.BytesIO(from_shell))
    assert discord_image.size == shell_image.size == (96, 64)  # the aspect kept, not squashed
    assert discord_image.mode == shell_image.mode == "RGB"
    assert discord_image.tobytes() == shell_image.tobytes()
    assert read_parameters(from_shell) == read_parameters(from_discord)


# -- per-model defaults and the SDXL family ---------------------------------------------------


def test_generate_with_tiny_turbo_uses_its_defaults(tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    assert main(["generate", "a fox", "--model", "tiny-turbo", "-o", str(out)]) == 0
    found = params(out)
    assert (found["Steps"], found["CFG scale"], found["Model"]) == ("2", "0", "tiny-turbo")
    assert main(["generate", "a fox", "--model", "tiny-turbo", "-o", str(out),
                 "--steps", "3", "--guidance", "1.5", "--scheduler", "LCM"]) == 0  # fmt: skip
    found = params(out)
    assert (found["Steps"], found["CFG scale"], found["Sampler"]) == ("3", "1.5", "LCM")
    # A model without defaults of its own keeps the built-in ones.
    assert main(["generate", "a fox", "--model", "tiny", "-o", str(out)]) == 0
    assert (params(out)["Steps"], params(out)["CFG scale"]) == ("20", "7")


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_generate_with_tiny_xl_in_every_mode(tmp_path: Path, mode: str) -> None:
    out = tmp_path / f"{mode}.png"
    args = ["generate", "a fox", "--model", "tiny-xl", "-o", str(out), "--steps", "3"]
    if mode != "txt2img":
        picture = tmp_path / "in.png"
        picture.write_bytes(images.with_hole() if mode == "inpaint" else images.photo((96, 64)))
        args += ["--image", str(picture), "--mode", mode]
    assert main(args) == 0
    found = params(out)
    assert (found["Model"], found["Steps"]) == ("tiny-xl", "3")
    assert Image.open(out).size == ((96, 64) if mode == "img2img" else (64, 64))
    if mode != "txt2img":
        assert found["Denoising strength"] == f"{DEFAULT_STRENGTH[mode]:g}"
