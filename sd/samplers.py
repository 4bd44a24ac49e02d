"""The samplers by name, as the CLI, the PNG metadata and `generate(sampler=...)` know them. Each is a module of its
own built on `sd/sampling.py` (the interface, the noise schedule, noise drawing)."""

from sd.ddim import DDIM
from sd.ddpm import DDPM
from sd.dpm_solver import DPMSolverPP2M
from sd.euler import Euler, EulerAncestral
from sd.lcm import LCM
from sd.lms import LMS
from sd.plms import PLMS
from sd.sampling import Sampler

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "plms": PLMS,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "lms": LMS,
    "dpmpp_2m": DPMSolverPP2M,
    "lcm": LCM,
}


def make_sampler(name: str, karras: bool = False, eta: float = 0.0) -> Sampler:
    """A sampler by name: ddpm, ddim, plms, euler, euler_a, lms, dpmpp_2m, lcm (LCM models and LoRAs). karras: the
    Karras sigma schedule (euler, lms, dpmpp_2m); eta: DDIM's noise (0: deterministic)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](karras=karras, eta=eta)
