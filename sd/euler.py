"""Euler and Euler ancestral (Karras et al. 2022's formulation, k-diffusion's samplers), in sigma space.

Euler integrates the probability-flow ODE dx/dsigma = (x - x0) / sigma with one Euler step per sigma. Euler
ancestral steps down to sigma_down and adds fresh noise of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.
As diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler."""

import torch

from sd.sampling import SigmaSampler, noise_like


class Euler(SigmaSampler):
    label = "Euler"

    def set_steps(self, steps: int, start: int = 0) -> None:
        self.set_sigmas(steps)

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma = self.sigmas[i]
        x = x.float()
        x0 = x - sigma * eps  # the denoised estimate
        # (x - x0) / sigma is eps again, but computed as diffusers does, so that the float32 rounding is the same
        derivative = (x - x0) / sigma
        return (x + derivative * (self.sigmas[i + 1] - sigma)).to(eps.dtype)


class EulerAncestral(SigmaSampler):
    label = "Euler a"
    supports_karras = False  # diffusers offers none for it

    def set_steps(self, steps: int, start: int = 0) -> None:
        self.set_sigmas(steps)

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x0 = x - sigma * eps
        derivative = (x - x0) / sigma  # eps, rounded as diffusers rounds it (see Euler)
        x = x + derivative * (sigma_down - sigma)
        return (x + noise_like(eps, generator) * sigma_up).to(eps.dtype)
