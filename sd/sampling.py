"""What every sampler shares: the interface the pipeline drives, SD v1's training noise schedule, noise drawing.
Each sampler module imports this one; `sd/samplers.py` names them all.

A sampler turns noise into an image's latents in `len(timesteps)` model evaluations:

    sampler.set_steps(steps, start)         # start = 0; image-to-image runs only the steps from `start` on
    x = noise * sampler.init_noise_sigma    # image-to-image: x = sampler.add_noise(x0, noise, start)
    for i in range(start, len(sampler.timesteps)):
        eps = unet(sampler.scale_input(x, i), sampler.timesteps[i], context)
        x = sampler.step(eps, i, x, generator)

Every sampler reproduces the numerics of its diffusers counterpart built from SD v1.5's scheduler config, step for
step, including when and how it draws random numbers (`noise()`), so a seed gives diffusers' image. One
deliberate difference: a multistep sampler's history (LMS, PLMS) begins at the first step taken, as in k-diffusion.
diffusers begins it at the schedule's first step even when image-to-image starts later, which leaves noise in the
image (diffusers issue 5630).
"""

import contextvars

import numpy as np
import torch

TRAIN_STEPS = 1000

# (steps taken before this one, its timestep) while the pipeline's sampling loop computes a step's noise prediction,
# else None: what hooks and caches inside the UNet (sd/study.py, sd/deepcache.py) know of where a generation is
CURRENT_STEP: contextvars.ContextVar[tuple[int, float] | None] = contextvars.ContextVar("CURRENT_STEP", default=None)
BETA_START, BETA_END = 0.00085, 0.012


def alphas_cumprod() -> torch.Tensor:
    """SD v1's training schedule: "scaled linear" betas (linear in sqrt(beta)), cumulative products of 1 - beta.
    [1000] float32, computed in float32 as the reference does."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise on `device` in `dtype`, but always drawn in float32 on the generator's device (the
    CPU for a CPU generator): a seed gives the same noise on every device and in every dtype."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device, dtype)


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return noise(x.shape, generator, x.device, x.dtype)


def leading_timesteps(steps: int, offset: int = 1) -> np.ndarray:
    """Every (1000 // steps)-th timestep, largest first, shifted by `offset`: 951, 901, ..., 1 for 20 steps. At 1000
    steps the offset would put the first at timestep 1000, past the schedule (diffusers fails there): it is dropped."""
    timesteps = (np.arange(0, steps) * (TRAIN_STEPS // steps)).round()[::-1].copy().astype(np.int64)
    return timesteps + min(offset, TRAIN_STEPS - 1 - int(timesteps[0]))


def linspace_timesteps(steps: int) -> np.ndarray:
    """`steps` evenly spaced (fractional) timesteps from 999 down to 0, float32."""
    return np.linspace(0, TRAIN_STEPS - 1, steps, dtype=np.float32)[::-1].copy()


def training_sigmas() -> np.ndarray:
    """sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) for t = 0..999: the noise-to-signal ratio, float32."""
    a = alphas_cumprod()
    return (((1 - a) / a) ** 0.5).numpy()


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s schedule: evenly spaced in sigma^(1/rho), which spends more steps at low noise."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma, interpolating log-sigma between neighbouring timesteps."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


class Sampler:
    """The interface the pipeline drives (see the module docstring). Subclasses set `timesteps` in `set_steps` and
    implement `step`; these defaults are the variance-preserving form x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""

    label = ""  # the name A1111 writes into PNG metadata
    supports_karras = False
    supports_eta = False

    def __init__(self, karras: bool = False, eta: float = 0.0):
        """karras: the Karras sigma schedule, where the sampler has one. eta: how much fresh noise a deterministic
        sampler adds at each step (DDIM's; 0: none)."""
        if karras and not self.supports_karras:
            raise ValueError(f"the {self.label} sampler has no Karras schedule; drop karras / --karras")
        if eta and not self.supports_eta:
            raise ValueError(f"eta applies to the ddim sampler only, not {self.label}; drop eta / --eta")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be between 0 and 1, got {eta}")
        self.karras, self.eta = karras, eta
        self.alphas_cumprod = alphas_cumprod()
        self.timesteps = torch.empty(0)
        self.init_noise_sigma = 1.0

    def set_steps(self, steps: int, start: int = 0) -> None:
        """The schedule for `steps` steps, of which this run takes those from index `start` on."""
        raise NotImplementedError

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x0 noised to the level of step i: where image-to-image starts."""
        a = self.alphas_cumprod[self.timesteps[i]].to(x0.device, x0.dtype)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def denoised(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The clean latents x0 that the noise prediction `eps` for x at step i points at (add_noise undone)."""
        a = self.alphas_cumprod[self.timesteps[i]].to(x.device, torch.float32)
        return (x.float() - (1 - a) ** 0.5 * eps.float()) / a**0.5


class SigmaSampler(Sampler):
    """Samplers that work in sigma space, x = x0 + sigma * noise (Euler, Euler ancestral, LMS: k-diffusion's form).
    Subclasses set `sigmas` ([steps + 1], ending at 0) and `timesteps` in `set_steps`."""

    supports_karras = True

    def set_sigmas(self, steps: int) -> None:
        """Evenly spaced timesteps 999..0 and their interpolated sigmas, or Karras sigmas and their timesteps."""
        timesteps, train = linspace_timesteps(steps), training_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        if self.karras:
            sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), steps)
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32))
        self.init_noise_sigma = self.sigmas.max().item()

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet was trained on variance-preserving inputs: x / sqrt(sigma^2 + 1)."""
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas[i].to(x0.device, x0.dtype)

    def denoised(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return x.float() - self.sigmas[i].to(x.device) * eps.float()
