"""The exponential moving average of the trained weights: what a run exports and evaluates."""

import copy

import torch


class EMA:
    """An exponential moving average of parameters with a warm-up: decay min(d, (1 + n) / (c + n)) at step n. The
    usual c = 10 averages over about the last tenth of a run; a smaller c averages over a longer stretch of it."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float, warmup: float):
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (self.warmup + step))
        for name, module in modules.items():
            for ema, p in zip(self.shadow[name].parameters(), module.parameters()):
                ema.lerp_(p.detach(), 1 - decay)
