"""LMS: the linear multi-step method (k-diffusion's `sample_lms`) on the probability-flow ODE in sigma space: the
next x uses the last (up to) four derivatives, weighted by integrals of their Lagrange basis polynomials over the
step. As diffusers' LMSDiscreteScheduler, whose integrals (scipy quad) are done exactly here."""

import numpy as np
import torch

from sd.sampling import SigmaSampler


class LMS(SigmaSampler):
    label = "LMS"
    order = 4

    def set_steps(self, steps: int, start: int = 0) -> None:
        self.set_sigmas(steps)
        self.derivatives: list[torch.Tensor] = []

    def coefficient(self, order: int, i: int, j: int) -> float:
        """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j} among
        sigma_i, ..., sigma_{i-order+1}."""
        nodes = [float(self.sigmas[i - k]) for k in range(order)]
        others = [s for k, s in enumerate(nodes) if k != j]
        basis = np.polynomial.Polynomial([1.0])
        for s in others:
            basis = basis * np.polynomial.Polynomial([-s, 1.0]) / (nodes[j] - s)
        integral = basis.integ()
        return float(integral(float(self.sigmas[i + 1])) - integral(float(self.sigmas[i])))

    def step(
        self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma = self.sigmas[i]
        x0 = x - sigma * eps  # the denoised estimate
        # (x - x0) / sigma is eps again, but computed as diffusers does, so that the float32 rounding is the same
        self.derivatives = [*self.derivatives, (x - x0) / sigma][-self.order :]
        order = len(self.derivatives)  # not i + 1: image-to-image has no derivatives from before its start
        coefficients = [self.coefficient(order, i, j) for j in range(order)]
        return x + sum(c * d for c, d in zip(coefficients, reversed(self.derivatives)))
