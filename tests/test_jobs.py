from __future__ import annotations

import dataclasses

import pytest

from bot.errors import InvalidRequest
from bot.jobs import MAX_SEED, GenerationRequest, snap_to_8


def make(**kw: object) -> GenerationRequest:
    base: dict[str, object] = {
        "prompt": "a cat",
        "model": "builtin:tiny",
        "width": 64,
        "height": 64,
    }
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


def test_a_valid_request_gets_a_seed_and_is_frozen() -> None:
    req = make()
    assert 0 <= req.seed <= MAX_SEED
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.steps = 3  # type: ignore[misc]


def test_seeds_differ_between_requests() -> None:
    assert len({make().seed for _ in range(20)}) > 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": " \n "}, "prompt is empty"),
        ({"prompt": "x" * 1001}, "1001 characters"),
        ({"negative_prompt": "x" * 2000}, "negative prompt is 2000"),
        ({"width": 63}, "width 63 is out of range"),
        ({"width": 1032}, "width 1032 is out of range"),
        ({"height": 100}, "height 100 is not a multiple of 8; try 96"),
        ({"width": 64.0}, "width must be a whole number"),
        ({"steps": 0}, "steps 0 is out of range; use 1 to 150"),
        ({"steps": True}, "steps must be a whole number"),
        ({"guidance": float("nan")}, "guidance nan is out of range"),
        ({"guidance": float("inf")}, "guidance inf"),
        ({"guidance": -1}, "guidance -1 is out of range"),
        ({"seed": -1}, "seed -1 is out of range"),
        ({"seed": 2**32}, "seed 4294967296 is out of range"),
        ({"model": ""}, "No model"),
    ],
)
def test_each_bad_value_is_named_with_the_allowed_range(
    kw: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")) as info:
        make(**kw)
    assert isinstance(info.value, ValueError)


def test_snap_to_8() -> None:
    assert [snap_to_8(v) for v in (64, 70, 71, 72, 513)] == [64, 64, 64, 72, 512]


def test_scheduler_names_are_canonical_so_batches_match() -> None:
    a, b = make(scheduler="euler A"), make(scheduler="Euler a")
    assert a.scheduler == "Euler a"
    assert a.batch_key() == b.batch_key()
    assert make(scheduler="DEFAULT").scheduler == "default"


def test_batch_key_ignores_prompt_seed_and_images_but_not_settings() -> None:
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    one = make(mode="img2img", init_image=image, prompt="x", seed=1, strength=0.5)
    two = make(mode="img2img", init_image=image.copy(), prompt="y", seed=2, strength=0.5)
    assert one.batch_key() == two.batch_key()
    assert one.batch_key() != make(mode="img2img", init_image=image, strength=0.6).batch_key()
    assert make(seed=MAX_SEED, count=2).seeds == [MAX_SEED, 0]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"scheduler": "k_euler"}, "Unknown scheduler 'k_euler'. Use one of: default, Euler"),
        ({"count": 0}, "count 0 is out of range; use 1 to 4"),
        ({"mode": "img2img"}, "img2img needs an input image"),
        ({"mode": "inpaint", "init_image": "x"}, "inpaint needs an input image"),
        ({"loras": (("a", 1.0),)}, "is not a LoRA choice"),
    ],
)
def test_more_bad_values(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(".", r"\.")):
        make(**kw)
