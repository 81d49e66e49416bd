"""AUTOMATIC1111's request and response shapes, as plain data: a txt2img or img2img body
read into an `ApiRequest` (each field checked, a 422 naming it when wrong; fields sdbot does
not use are ignored, as clients send many), and the `info` a result answers with.

Nothing here reads the database or decodes images: bot/http_api/intake.py does that.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bot.errors import InvalidRequest
from bot.jobs import MAX_COUNT, MAX_SIZE, MIN_SIZE, GenerationRequest
from bot.samplers import SCHEDULER_NAMES, canonical_name

#: A1111's scheduler names that mean "the sampler's own schedule" and "with Karras sigmas".
AUTOMATIC_SCHEDULERS = ("automatic", "default", "")
SCHEDULERS: tuple[tuple[str, str], ...] = (("automatic", "Automatic"), ("karras", "Karras"))
#: A1111 titles end in " [hash]"; clients send the title back as sd_model_checkpoint.
_TITLE_HASH = re.compile(r"\s*\[[0-9A-Fa-f]{0,64}\]\s*$")
#: A base64 image may come as a data URL ("data:image/png;base64,....").
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def json_object(data: Any, what: str = "The request body") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} must be a JSON object.")
    return data


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be a whole number, got {_show(value)}.")
    return value


def _pixels(body: Mapping[str, Any], name: str) -> int | None:
    """A width or height: None (or 0, which some clients send for "the default") when not
    given, else within sdbot's bounds, refused here before anything is sized to it."""
    value = _integer(body, name)
    if not value:
        return None
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise InvalidRequest(
            f"{name} {value} is out of range; use {MIN_SIZE} to {MAX_SIZE} pixels."
        )
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number, got {_show(value)}.")
    return float(value)


def _text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, got {_show(value)}.")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:59] + "…"


def model_name(text: str) -> str:
    """A checkpoint as clients name it: a model name, or an A1111 title ("name [hash]")."""
    return _TITLE_HASH.sub("", text).strip()


def base64_payload(text: str) -> str:
    """A base64 image without its data-URL header, if it had one."""
    return _DATA_URL.sub("", text.strip(), count=1)


def sampler_of(sampler_name: str | None, scheduler: str | None) -> str | None:
    """A1111's sampler and scheduler as one of sdbot's sampler names (None: the default).

    A1111 1.9 split "DPM++ 2M Karras" into sampler "DPM++ 2M" and scheduler "Karras"; older
    clients send the joined name as the sampler. Both are accepted.
    """
    schedule = (scheduler or "").strip().lower()
    if not sampler_name or not sampler_name.strip():
        if schedule not in AUTOMATIC_SCHEDULERS:
            raise InvalidRequest(f"scheduler {scheduler!r} needs a sampler_name to go with it.")
        return None
    name = canonical_name(sampler_name)
    if schedule in AUTOMATIC_SCHEDULERS:
        return name
    if schedule == "karras":
        if name.endswith(" Karras"):
            return name
        joined = f"{name} Karras"
        if joined in SCHEDULER_NAMES:
            return joined
        raise InvalidRequest(f"The sampler {name!r} has no Karras schedule here; use Automatic.")
    raise InvalidRequest(
        f"Unknown scheduler {scheduler!r}; use {' or '.join(label for _, label in SCHEDULERS)}."
    )


@dataclass(frozen=True)
class ApiRequest:
    """An A1111 txt2img/img2img body, its fields checked; None = not given (a default
    applies). Images stay base64 text until intake decodes them under the bot's limits."""

    mode: str  # "txt2img" or "img2img" (img2img with a mask runs as inpaint)
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    model: str | None = None
    denoising_strength: float | None = None
    init_image: str | None = None
    mask: str | None = None
    mask_invert: bool = False

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter

    def stored(self) -> dict[str, Any]:
        """What a refused request's job row keeps (no image data)."""
        out: dict[str, Any] = {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "steps": self.steps, "guidance": self.cfg_scale, "width": self.width,
            "height": self.height, "scheduler": self.sampler, "count": self.count,
            "model": self.model,
        }  # fmt: skip
        if self.mode != "txt2img":
            out["strength"] = self.denoising_strength
        return {k: v for k, v in out.items() if v is not None}


def parse_request(data: Any, mode: str) -> ApiRequest:
    """Read an A1111 body; InvalidRequest names the first bad field."""
    body = json_object(data)
    prompt = _text(body, "prompt") or ""
    seed = _integer(body, "seed")
    if seed is not None and seed < 0:
        seed = None  # A1111: -1 = random
    batch_size = _integer(body, "batch_size") or 1
    n_iter = _integer(body, "n_iter") or 1
    if batch_size < 1 or n_iter < 1:
        raise InvalidRequest("batch_size and n_iter must be at least 1.")
    if batch_size * n_iter > MAX_COUNT:
        raise InvalidRequest(
            f"batch_size × n_iter is {batch_size * n_iter} images; "
            f"sdbot makes at most {MAX_COUNT} per request."
        )
    sampler_name = _text(body, "sampler_name") or _text(body, "sampler_index")
    overrides = body.get("override_settings") or {}
    model = None
    if isinstance(overrides, dict) and overrides.get("sd_model_checkpoint"):
        model = model_name(str(overrides["sd_model_checkpoint"]))
    init_image = mask = None
    strength = None
    if mode == "img2img":
        images = body.get("init_images")
        if not isinstance(images, list) or not images or not isinstance(images[0], str):
            raise InvalidRequest("init_images must be a list with one base64 image.")
        init_image = base64_payload(images[0])
        mask_text = _text(body, "mask")
        mask = base64_payload(mask_text) if mask_text else None
        strength = _number(body, "denoising_strength")
    return ApiRequest(
        mode=mode,
        prompt=prompt,
        negative_prompt=_text(body, "negative_prompt") or "",
        seed=seed,
        steps=_integer(body, "steps"),
        cfg_scale=_number(body, "cfg_scale"),
        width=_pixels(body, "width"),
        height=_pixels(body, "height"),
        sampler=sampler_of(sampler_name, _text(body, "scheduler")),
        batch_size=batch_size,
        n_iter=n_iter,
        model=model,
        denoising_strength=strength,
        init_image=init_image,
        mask=mask,
        mask_invert=bool(_integer(body, "inpainting_mask_invert")),
    )


def echo(api: ApiRequest, request: GenerationRequest) -> dict[str, Any]:
    """The `parameters` of a response: the request's fields as they were run."""
    out: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "steps": request.steps,
        "cfg_scale": request.guidance,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.scheduler,
        "batch_size": api.batch_size,
        "n_iter": api.n_iter,
        "override_settings": {"sd_model_checkpoint": request.model},
    }
    if api.mode == "img2img":
        out.update(
            denoising_strength=request.strength,
            inpainting_mask_invert=int(api.mask_invert),
            init_images=None,
            mask=None,
        )
    return out


def info(
    api: ApiRequest,
    request: GenerationRequest,
    *,
    seeds: Sequence[int],
    infotexts: Sequence[str],
    sampler: str,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The `info` object (sent as a JSON string, as A1111 does)."""
    n = len(seeds)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": list(seeds),
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler,
        "cfg_scale": request.guidance,
        "steps": request.steps,
        "batch_size": api.batch_size,
        "n_iter": api.n_iter,
        "restore_faces": False,
        "sd_model_name": request.model,
        "sd_model_hash": None,
        "denoising_strength": request.strength if request.mode != "txt2img" else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(infotexts),
        "styles": [],
        "job_timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": request.mode == "inpaint",
        "interrupted": interrupted,
        "version": "sdbot",
    }
