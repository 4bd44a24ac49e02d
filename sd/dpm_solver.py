"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the diffusion ODE in log-SNR time
lambda = log(alpha / sigma), on x0 predictions: first order at the first and last steps, second order between,
reusing the previous step's prediction. As diffusers' DPMSolverMultistepScheduler (its defaults, midpoint form)."""

import numpy as np
import torch

from sd.sampling import TRAIN_STEPS, Sampler, karras_sigmas, sigma_to_t, training_sigmas


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma (noise-to-signal ratio) -> (alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t noise."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


class DPMSolverPP2M(Sampler):
    label = "DPM++ 2M"
    supports_karras = True

    def set_steps(self, steps: int, start: int = 0) -> None:
        train = training_sigmas()
        if self.karras:
            sigmas = karras_sigmas(train[-1].item(), train[0].item(), steps)
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas]).round()
        else:
            timesteps = np.linspace(0, TRAIN_STEPS - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
            # near 1000 steps rounding repeats a timestep, a step of zero length (NaN): each is taken once
            timesteps = timesteps[np.sort(np.unique(timesteps, return_index=True)[1])]
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(torch.int64)
        self.previous_x0: torch.Tensor | None = None
        self.steps_taken = 0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        alpha, sigma = alpha_sigma(self.sigmas[i].to(x0.device, x0.dtype))
        return alpha * x0 + sigma * noise

    def denoised(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(self.sigmas[i].to(x.device))
        return (x.float() - sigma * eps.float()) / alpha

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        alpha_s, sigma_s = alpha_sigma(self.sigmas[i])
        x0 = (x - sigma_s * eps) / alpha_s
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i + 1])
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
        x = x.float()
        last = i == len(self.timesteps) - 1  # to sigma 0: lambda is infinite, the first-order step lands on x0
        if self.steps_taken == 0 or last:
            x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_r, sigma_r = alpha_sigma(self.sigmas[i - 1])
            r = ((torch.log(alpha_s) - torch.log(sigma_s)) - (torch.log(alpha_r) - torch.log(sigma_r))) / h
            d1 = (1.0 / r) * (x0 - self.previous_x0)
            x_next = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        self.previous_x0 = x0
        self.steps_taken += 1
        return x_next.to(eps.dtype)
