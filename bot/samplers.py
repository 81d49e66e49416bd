"""Samplers by their AUTOMATIC1111 names, built as diffusers schedulers.

The name table is plain data (no diffusers import), so request validation and slash-command
choices can use it cheaply; `make_scheduler` imports diffusers only on the GPU thread.
Mapping after diffusers' own A1111 table (docs: "Schedulers" overview).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from bot.errors import InvalidRequest

DEFAULT = "default"  # the model's own scheduler, as its repo configures it


@dataclass(frozen=True)
class _Sampler:
    cls: str  # diffusers class name
    options: Mapping[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# Left out on purpose: "DPM++ SDE" (DPMSolverSDEScheduler needs torchsde), "DPM++ 2S a",
# "DPM fast" and "DPM adaptive" (no diffusers equivalent).
_SAMPLERS: dict[str, _Sampler] = {
    "Euler": _Sampler("EulerDiscreteScheduler"),
    "Euler a": _Sampler("EulerAncestralDiscreteScheduler"),
    "DPM++ 2M": _Sampler("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": _Sampler("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": _Sampler("DPMSolverMultistepScheduler", _SDE),
    "DPM++ 2M SDE Karras": _Sampler("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "DPM2": _Sampler("KDPM2DiscreteScheduler"),
    "DPM2 Karras": _Sampler("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": _Sampler("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": _Sampler("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "Heun": _Sampler("HeunDiscreteScheduler"),
    "LMS": _Sampler("LMSDiscreteScheduler"),
    "LMS Karras": _Sampler("LMSDiscreteScheduler", _KARRAS),
    # SD latents are not in [-1, 1] and SD's schedule ends at alpha < 1: DDIM's and PNDM's
    # defaults (made for pixel models) are wrong for them unless the model's config says so.
    "DDIM": _Sampler("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    # PLMS is PNDM without its Runge-Kutta warm-up steps (CompVis's PLMS sampler).
    "PLMS": _Sampler("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "UniPC": _Sampler("UniPCMultistepScheduler"),
    # For LCM-distilled models (and LCM LoRAs): 2-8 steps, low guidance. On other models it
    # runs but gives blurry images.
    "LCM": _Sampler("LCMScheduler"),
}

#: Every sampler name a request may use besides "default", in menu order.
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)
_BY_LOWER = {name.lower(): name for name in SCHEDULER_NAMES}


def canonical_name(name: str) -> str:
    """`name` spelled as in SCHEDULER_NAMES (case-insensitive), or "default"."""
    text = str(name).strip()
    if text.lower() == DEFAULT:
        return DEFAULT
    found = _BY_LOWER.get(text.lower())
    if found is None:
        raise InvalidRequest(
            f"Unknown scheduler {text!r}. Use one of: {DEFAULT}, {', '.join(SCHEDULER_NAMES)}."
        )
    return found


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler for sampler `name`, keeping the model's noise schedule.

    `base_config` is the model's own scheduler config (with `_class_name`): betas,
    prediction type (v-prediction for SD 2.x 768) and timestep spacing carry over, so
    every sampler fits the model. "default" rebuilds the model's own scheduler.
    """
    name = canonical_name(name)
    if name == DEFAULT:
        cls_name = str(base_config.get("_class_name", "PNDMScheduler"))
        return _scheduler_class(cls_name).from_config(dict(base_config))
    sampler = _SAMPLERS[name]
    config = dict(base_config)
    # A default scheduler with Karras sigmas must not leak them into "Euler" or "DPM++ 2M".
    config.pop("use_karras_sigmas", None)
    if sampler.cls == "DPMSolverMultistepScheduler":
        config.pop("algorithm_type", None)
    return _scheduler_class(sampler.cls).from_config(config, **dict(sampler.options))


def scheduler_label(scheduler: Any) -> str:
    """The A1111 name of a scheduler instance (for the PNG `Sampler:` field)."""
    config = getattr(scheduler, "config", {})
    key = _signature(type(scheduler).__name__, config)
    for name, sampler in _SAMPLERS.items():
        if _signature(sampler.cls, sampler.options) == key:
            return name
    return type(scheduler).__name__


def _signature(cls_name: str, options: Mapping[str, Any]) -> tuple[str, bool, bool]:
    karras = bool(options.get("use_karras_sigmas", False))
    sde = str(options.get("algorithm_type", "")).startswith("sde")
    return cls_name, karras, sde


def _scheduler_class(cls_name: str) -> Any:
    import diffusers

    if cls_name == "LMSDiscreteScheduler":
        return _lms_class()
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise InvalidRequest(f"This diffusers has no scheduler class {cls_name}.")
    return cls


@cache
def _lms_class() -> Any:
    """LMSDiscreteScheduler without SciPy.

    diffusers integrates each Lagrange basis polynomial with scipy.integrate.quad; the
    integral of a polynomial is exact with numpy, so sdbot needs no SciPy for "LMS".
    """
    import numpy as np

    # The module, not `diffusers.LMSDiscreteScheduler`: without SciPy the top-level name is a
    # placeholder that refuses to be built.
    from diffusers.schedulers import scheduling_lms_discrete

    class LMSDiscreteScheduler(scheduling_lms_discrete.LMSDiscreteScheduler):  # type: ignore[misc]
        def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
            all_sigmas: Any = self.sigmas  # type: ignore[attr-defined]  # set by set_timesteps
            sigmas = [float(all_sigmas[t - k]) for k in range(order)]
            poly = np.polynomial.Polynomial([1.0])
            for k in range(order):
                if k == current_order:
                    continue
                poly *= np.polynomial.Polynomial([-sigmas[k], 1.0]) / (
                    sigmas[current_order] - sigmas[k]
                )
            antiderivative = poly.integ()
            lo, hi = float(all_sigmas[t]), float(all_sigmas[t + 1])
            return float(antiderivative(hi) - antiderivative(lo))

    return LMSDiscreteScheduler
