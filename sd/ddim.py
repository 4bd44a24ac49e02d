"""DDIM (Song et al. 2021): x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, with
s = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)): deterministic at eta = 0, DDPM-like at eta = 1.
As diffusers' DDIMScheduler with SD v1.5's config (the last step lands on alpha_bar[0], not 1)."""

import torch

from sd.sampling import TRAIN_STEPS, Sampler, leading_timesteps, noise_like


class DDIM(Sampler):
    label = "DDIM"
    supports_eta = True

    def set_steps(self, steps: int, start: int = 0) -> None:
        self.timesteps = torch.from_numpy(leading_timesteps(steps))
        self.stride = TRAIN_STEPS // steps

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = self.timesteps[i]
        prev = t - self.stride
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.alphas_cumprod[0]
        beta_t = 1 - a_t
        x0 = (x - beta_t**0.5 * eps) / a_t**0.5
        std = self.eta * ((1 - a_prev) / beta_t * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * noise_like(eps, generator)
        return x_prev
