"""LCM (Luo et al. 2023): the latent consistency model's multistep sampler, for UNets distilled to map any noisy
latent straight to its clean end point (an LCM checkpoint, or SD v1.5 with the LCM-LoRA) in 2-8 steps.

Each step takes the model's clean estimate x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), blends it with x by the
consistency model's boundary condition (c_skip x + c_out x0, which is x at t = 0), and, but at the last step, noises
that to the next timestep with fresh noise. The timesteps are evenly spaced indices into the 50-step schedule the
model was distilled on (999, 979, ..., 19): 4 steps take 999, 759, 499, 259. As diffusers' LCMScheduler with its
defaults (original_inference_steps 50, timestep_scaling 10)."""

import numpy as np
import torch

from sd.sampling import TRAIN_STEPS, Sampler, noise_like

ORIGINAL_STEPS = 50  # the schedule the consistency model was distilled on
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


class LCM(Sampler):
    label = "LCM"

    def set_steps(self, steps: int, start: int = 0) -> None:
        if steps > ORIGINAL_STEPS:
            raise ValueError(f"the LCM sampler takes at most {ORIGINAL_STEPS} steps (its distillation schedule's)")
        distilled = (np.arange(1, ORIGINAL_STEPS + 1) * (TRAIN_STEPS // ORIGINAL_STEPS) - 1)[::-1]
        picked = np.floor(np.linspace(0, ORIGINAL_STEPS, num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = torch.from_numpy(distilled[picked].copy())

    def denoised(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The consistency model's answer: its clean estimate x0 blended with x by the boundary condition."""
        t = self.timesteps[i]
        a_t = self.alphas_cumprod[t]
        scaled = t * TIMESTEP_SCALING
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return c_out * x0 + c_skip * x

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        denoised = self.denoised(eps, i, x)
        if i == len(self.timesteps) - 1:
            return denoised
        a_next = self.alphas_cumprod[self.timesteps[i + 1]]
        return a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise_like(eps, generator)
