"""Samplers by the names A1111 shows (and writes into PNG info), as diffusers schedulers.

The mapping follows diffusers' own table of A1111/k-diffusion equivalents. `DPM++ SDE Karras` is
DPMSolverSDEScheduler, which needs the `torchsde` package; its Brownian noise is seeded from the
image seed (`seed_scheduler`), so it is as repeatable as the others.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from loraforge.errors import ForgeError

DEFAULT_SAMPLER = "DPM++ 2M Karras"


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    options: dict[str, Any] = field(default_factory=dict)
    needs: str | None = None  # an extra package the scheduler imports


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    Sampler("DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True},
            needs="torchsde"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    Sampler("Heun", "HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler", {"use_karras_sigmas": False}),
)}
_BY_KEY = {name.lower().replace(" ", ""): name for name in SAMPLERS}
KARRAS = " Karras"


def infotext_sampler(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them: `DPM++ 2M Karras` is
    (`DPM++ 2M`, `Karras`); a sampler on its own default schedule is (name, `Automatic`)."""
    if name.endswith(KARRAS):
        return name.removesuffix(KARRAS), KARRAS.strip()
    return name, "Automatic"


def check_sampler(name: str, where: str | None = None) -> str:
    """The canonical sampler name for `name` (case and spaces ignored); ForgeError if unknown."""
    key = str(name).lower().replace(" ", "")
    if key in _BY_KEY:
        return _BY_KEY[key]
    close = difflib.get_close_matches(str(name), list(SAMPLERS), n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    prefix = f"{where}: " if where else ""
    raise ForgeError(f"{prefix}unknown sampler `{name}`{hint}",
                     fix="use one of: " + ", ".join(f"`{n}`" for n in SAMPLERS))


def make_scheduler(name: str, scheduler_config: Any) -> Any:
    """A fresh diffusers scheduler for the A1111 sampler `name`, from a base model's scheduler
    config (e.g. `pipe.scheduler.config`, or a dict read from scheduler_config.json)."""
    import diffusers

    sampler = SAMPLERS[check_sampler(name)]
    if sampler.needs:
        import importlib.util

        if importlib.util.find_spec(sampler.needs) is None:
            raise ForgeError(f"the sampler `{sampler.name}` needs the Python package "
                             f"`{sampler.needs}`, which is not installed",
                             fix=f"install it (`pip install {sampler.needs}` in lora_env, or "
                                 "rerun ./setup_forge.sh), or pick another sampler")
    cls = getattr(diffusers, sampler.scheduler)
    config = dict(scheduler_config)
    config.pop("_class_name", None)
    return cls.from_config(config, **sampler.options)


def seed_scheduler(scheduler: Any, seeds: list[int]) -> None:
    """Make a scheduler's own noise (if it draws any outside the generator) follow `seeds`,
    one per image of the batch."""
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = seeds
        scheduler.noise_sampler = None
