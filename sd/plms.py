"""PLMS (Liu et al. 2022, pseudo linear multi-step): a 4th-order Adams-Bashforth step on the noise estimates, with
the DDIM-like transfer x_t -> x_{t-1}. As diffusers' PNDMScheduler with `skip_prk_steps`: the Runge-Kutta warm-up
is replaced by one extra model evaluation, so `steps` steps take `steps + 1` evaluations. Image-to-image does the
warm-up at its first step, so its history never mixes in steps it did not take."""

import numpy as np
import torch

from sd.sampling import TRAIN_STEPS, Sampler, leading_timesteps


class PLMS(Sampler):
    label = "PLMS"

    def set_steps(self, steps: int, start: int = 0) -> None:
        self.stride = TRAIN_STEPS // steps
        t = leading_timesteps(steps)
        # the timestep after the first one taken is repeated: those two evaluations are one second-order step
        self.timesteps = torch.from_numpy(np.concatenate([t[: start + 2], t[start + 1 :]]))
        self.eps_history: list[torch.Tensor] = []
        self.evaluations = 0
        self.first_sample: torch.Tensor | None = None

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = int(self.timesteps[i])
        prev = t - self.stride
        if self.evaluations == 1:  # the warm-up's second evaluation re-does the first jump from the first sample
            prev, t = t, t + self.stride
        else:
            self.eps_history = [*self.eps_history[-3:], eps]
        e = self.eps_history
        if len(e) == 1 and self.evaluations == 0:
            self.first_sample = x
        elif len(e) == 1 and self.evaluations == 1:
            eps, x, self.first_sample = (eps + e[-1]) / 2, self.first_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.evaluations += 1
        return self.transfer(x, t, prev, eps)

    def transfer(self, x: torch.Tensor, t: int, prev: int, eps: torch.Tensor) -> torch.Tensor:
        """x_t -> x_prev given a noise estimate (the PNDM paper's phi, equal to a DDIM step)."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.alphas_cumprod[0]
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        denominator = a_t * beta_prev**0.5 + (a_t * beta_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denominator
