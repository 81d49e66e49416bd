from __future__ import annotations

import io

from PIL import Image

from bot.imaging import (
    encode_png,
    format_parameters,
    parse_parameters,
    read_parameters,
    sampler_name,
)


def test_parameters_follow_automatic1111_line_by_line() -> None:
    text = format_parameters(
        prompt="a cat, (blue:1.2)",
        negative_prompt="blurry",
        steps=20,
        sampler="Euler a",
        guidance=7.5,
        seed=42,
        width=512,
        height=768,
        model="dreamshaper",
    )
    assert text.split("\n") == [
        "a cat, (blue:1.2)",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: dreamshaper",
    ]


def test_no_negative_prompt_line_when_empty() -> None:
    text = format_parameters(
        prompt="p", negative_prompt="", steps=1, sampler="DDIM", guidance=7.0, seed=1,
        width=64, height=64, model="m",
    )  # fmt: skip
    assert text == "p\nSteps: 1, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Model: m"


def test_png_round_trip() -> None:
    text = (
        "multi\nline prompt\nNegative prompt: bad\n"
        "Steps: 4, Sampler: PLMS, CFG scale: 7, Seed: 9, Size: 8x8, Model: builtin:tiny"
    )
    data = encode_png(Image.new("RGB", (8, 8), "red"), text)
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (255, 0, 0)
    assert read_parameters(data) == text
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "multi\nline prompt"
    assert parsed["negative_prompt"] == "bad"
    assert (
        parsed["Seed"] == "9" and parsed["Model"] == "builtin:tiny" and parsed["Sampler"] == "PLMS"
    )


def test_png_without_parameters() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert read_parameters(buf.getvalue()) is None


def test_sampler_names() -> None:
    assert sampler_name("EulerAncestralDiscreteScheduler") == "Euler a"
    assert sampler_name("DPMSolverMultistepScheduler") == "DPM++ 2M"
    assert sampler_name("SomethingNew") == "SomethingNew"
