"""Per-model defaults in models.toml (steps, guidance, sampler, variant, family), the one
resolution every front uses and the few-step catalog entries (`sdbot generate` with them is in
test_cli_generate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bot.catalog import BUILTIN_TINY, BUILTIN_TINY_XL, Catalog, ModelEntry, parse_catalog
from bot.errors import SettingsError
from bot.inputs import DEFAULT_STRENGTH, Fallbacks, option_defaults
from bot.jobs import GenerationRequest
from bot.samplers import SCHEDULER_NAMES, canonical_name


def entry(**fields: object) -> ModelEntry:
    text = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in fields.items())
    [found] = parse_catalog(f'[models.m]\nsource = "builtin:tiny"\n{text}\n', where="test")
    return found


# -- models.toml ---------------------------------------------------------------------------------


def test_the_new_keys_are_read_and_checked() -> None:
    found = entry(steps=4, guidance=1.5, sampler="lcm", variant="fp16", family="sdxl")
    assert (found.steps, found.guidance, found.sampler, found.variant, found.family) == (
        4, 1.5, "LCM", "fp16", "sdxl",
    )  # fmt: skip
    plain = entry()
    assert (plain.steps, plain.guidance, plain.sampler, plain.variant, plain.family) == (
        None, None, None, None, None,
    )  # fmt: skip
    assert entry(guidance=0).guidance == 0.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "`steps` 0 is out of range; use 1 to 150"),
        ({"steps": 2.5}, "`steps` must be a whole number"),
        ({"guidance": 31}, "`guidance` 31 is out of range; use 0 to 30"),
        ({"guidance": "high"}, "`guidance` must be a number"),
        ({"sampler": "Euler b"}, "`sampler`: Unknown scheduler 'Euler b'"),
        ({"variant": "../fp16"}, "`variant` must be a weights variant"),
        ({"family": "sd3"}, "`family` must be one of sd, sdxl"),
    ],
)
def test_bad_values_are_refused_naming_the_model(fields: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        entry(**fields)
    assert "The model catalog test, model 'm'" in info.value.message
    assert message in info.value.message


def test_the_shipped_catalog_has_few_step_and_sdxl_models(tmp_path: Path) -> None:
    catalog = Catalog.load(None, tmp_path)
    turbo = catalog.get("tiny-turbo")
    assert (turbo.source, turbo.steps, turbo.guidance) == (BUILTIN_TINY, 2, 0.0)
    assert catalog.get("tiny-xl").source == BUILTIN_TINY_XL
    assert catalog.get("tiny-xl").family == "sdxl"
    assert catalog.resolve(BUILTIN_TINY_XL).name == "tiny-xl"
    assert catalog.resolve(BUILTIN_TINY).name == "tiny"  # the first entry with that source
    by_source = {e.source: e for e in catalog.entries}
    sd_turbo, xl_turbo = by_source["stabilityai/sd-turbo"], by_source["stabilityai/sdxl-turbo"]
    assert (sd_turbo.steps, sd_turbo.guidance, sd_turbo.family) == (1, 0.0, None)
    assert (xl_turbo.steps, xl_turbo.guidance, xl_turbo.family) == (1, 0.0, "sdxl")
    lcm = by_source["SimianLuo/LCM_Dreamshaper_v7"]
    assert (lcm.steps, lcm.sampler) == (4, "LCM")
    base = by_source["stabilityai/stable-diffusion-xl-base-1.0"]
    assert (base.native_size, base.variant, base.family) == (1024, "fp16", "sdxl")
    fine_tune = by_source["Lykon/dreamshaper-xl-1-0"]
    assert (fine_tune.native_size, fine_tune.family) == (1024, "sdxl")
    assert "LCM" in SCHEDULER_NAMES and canonical_name("lcm") == "LCM"


# -- the resolution ------------------------------------------------------------------------------


def test_the_member_wins_then_the_model_then_the_server_then_the_builtin() -> None:
    turbo = entry(steps=2, guidance=0, sampler="Euler a")
    server = Fallbacks(steps=30, guidance=5.0, scheduler="DDIM")
    assert option_defaults(turbo, steps=6, guidance=3.0, scheduler="UniPC", server=server) == {
        "steps": 6, "guidance": 3.0, "scheduler": "UniPC", "width": 512, "height": 512,
    }  # fmt: skip
    picked = option_defaults(turbo, server=server)
    assert (picked["steps"], picked["guidance"], picked["scheduler"]) == (2, 0.0, "Euler a")
    plain = option_defaults(entry(), server=server)
    assert (plain["steps"], plain["guidance"], plain["scheduler"]) == (30, 5.0, "DDIM")
    builtin = option_defaults(entry())
    assert (builtin["steps"], builtin["guidance"], builtin["scheduler"]) == (20, 7.0, "default")
    # A member's explicit 0 is an answer, not "not given".
    assert option_defaults(entry(guidance=4), guidance=0.0)["guidance"] == 0.0


def test_a_one_step_model_gets_enough_steps_for_the_strength_of_an_edit() -> None:
    one_step = entry(steps=1, guidance=0)
    for strength in (DEFAULT_STRENGTH["img2img"], 0.3, 0.05):
        fields = option_defaults(one_step, strength=strength)
        assert int(fields["steps"] * strength) >= 1 > int((fields["steps"] - 1) * strength)
        GenerationRequest(
            prompt="x", model="m", mode="img2img", strength=strength, init_image=Image.new(
                "RGB", (64, 64)
            ), **fields,
        )  # fmt: skip
    # Steps the member gave are kept (and refused in words if they leave no step).
    assert option_defaults(one_step, steps=1, strength=0.5)["steps"] == 1
    assert option_defaults(one_step, strength=float("nan"))["steps"] == 1
