"""PNG encoding with AUTOMATIC1111-compatible `parameters` metadata, and reading it back.

Runs off the GPU thread: encoding a PNG is CPU work the GPU should not wait for.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

from PIL import Image, PngImagePlugin

# diffusers scheduler class -> the sampler name A1111 and its readers use.
SAMPLER_NAMES: Mapping[str, str] = {
    "PNDMScheduler": "PLMS",
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "DDPMScheduler": "DDPM",
}


def sampler_name(scheduler_class: str) -> str:
    return SAMPLER_NAMES.get(scheduler_class, scheduler_class)


def format_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The `parameters` text exactly as AUTOMATIC1111 writes it."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": f"{guidance:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    fields.update(extra or {})
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The `parameters` chunk of a PNG made by us, A1111 or any tool that follows it."""
    with Image.open(io.BytesIO(data)) as img:
        text = img.info.get("parameters")
    return text if isinstance(text, str) else None


_FIELD_RE = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Split A1111 `parameters` text into prompt, negative prompt and the key/value fields."""
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    fields_line = lines[-1] if len(lines) > 1 or "Steps:" in lines[-1] else ""
    body = lines[:-1] if fields_line else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in body:
        if line.startswith("Negative prompt:") or negative_lines:
            negative_lines.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt_lines.append(line)
    result["prompt"] = "\n".join(prompt_lines)
    result["negative_prompt"] = "\n".join(negative_lines)
    for key, value in _FIELD_RE.findall(fields_line):
        result[key.strip()] = value.strip()
    return result
