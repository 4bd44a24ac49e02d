"""DDPM (Ho et al. 2020): the ancestral sampler, drawing x_{t-1} from the Gaussian posterior q(x_{t-1} | x_t, x_0)
with x_0 predicted from the noise estimate. Fresh noise at every step. As diffusers' DDPMScheduler."""

import torch

from sd.sampling import Sampler, leading_timesteps, noise_like


class DDPM(Sampler):
    label = "DDPM"

    def set_steps(self, steps: int, start: int = 0) -> None:
        self.timesteps = torch.from_numpy(leading_timesteps(steps))

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = self.timesteps[i]
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else torch.tensor(1.0)
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # of this (possibly multi-timestep) jump
        x0 = (x - beta_t**0.5 * eps) / a_t**0.5
        mean = (a_prev**0.5 * beta / beta_t) * x0 + (alpha**0.5 * beta_prev / beta_t) * x
        if t > 0:
            variance = torch.clamp(beta_prev / beta_t * beta, min=1e-20)
            mean = mean + variance**0.5 * noise_like(eps, generator)
        return mean
