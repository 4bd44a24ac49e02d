"""The per-step model call: from the prompts' contexts to the guided noise prediction of every image, each step.

A prompt (A1111's syntax, sd/prompts.py) becomes one or more sub-prompts (split at AND, each with a weight), each a
schedule of contexts over the steps (prompt editing); the negative prompt is one schedule. At every step the UNet
predicts the noise under each context the step needs, in as few calls as the contexts' lengths allow, and guidance
combines them (composable diffusion, Liu et al. 2022; one sub-prompt of weight 1 is plain classifier-free guidance):

    eps = eps(negative) + cfg * sum_i w_i (eps(sub-prompt i) - eps(negative))
"""

import re
import warnings
from dataclasses import dataclass

import torch

from sd.models import Models
from sd.prompts import encode_prompt, schedule, split_and

# generate() takes a prompt's <lora:...> tags out first (sd/lora.py); these are the ones left: a negative prompt's
# and the kinds sd does not read
EXTRA_NETWORK = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>")


@dataclass
class Scheduled:
    """A context per stretch of steps: `contexts[k]` applies up to and including step `ends[k]` (steps from 0, as
    A1111 counts them when it picks one)."""

    ends: list[int]
    contexts: list[torch.Tensor]  # [1, tokens, width] each

    def at(self, step: int) -> torch.Tensor:
        return next((c for end, c in zip(self.ends, self.contexts) if step <= end), self.contexts[-1])


def scheduled(models: Models, prompt: str, steps: int, clip_skip: int, emphasis: str, cache: dict) -> Scheduled:
    """A prompt's contexts over `steps` steps; each distinct text is encoded once (`cache`: text -> context)."""
    ends, contexts = [], []
    for end, text in schedule(prompt, steps):
        if text not in cache:
            cache[text] = encode_prompt(models, text, clip_skip, emphasis)
        ends.append(end)
        contexts.append(cache[text])
    return Scheduled(ends, contexts)


class Guidance:
    """For each image of a batch: its negative prompt's schedule and its sub-prompts' schedules with weights."""

    def __init__(self, negatives: list[Scheduled], positives: list[list[tuple[Scheduled, float]]], cfg_scale: float):
        self.negatives, self.positives, self.cfg_scale = negatives, positives, cfg_scale
        plain = all(len(subs) == 1 and subs[0][1] == 1 for subs in positives)
        # without guidance the prompt's own prediction is used; AND or a weight still needs the negative
        self.guided = cfg_scale > 1 or not plain

    @classmethod
    def build(
        cls,
        models: Models,
        prompts: list[str],
        negatives: list[str],
        images_per_prompt: int,
        steps: int,
        cfg_scale: float,
        clip_skip: int = 1,
        emphasis: str = "original",
        pad_prompts: bool = False,
    ) -> "Guidance":
        """pad_prompts: bring every context to the longest one's length with empty-prompt chunks (A1111's
        pad_cond_uncond), so that one UNet call serves them all; it changes the numbers, so it is off by default."""
        for tag in sorted({tag for prompt in prompts + negatives for tag in EXTRA_NETWORK.findall(prompt)}):
            message = f"{tag} is A1111's extra-network syntax, which sd does not read yet; it stays as text"
            warnings.warn(message, stacklevel=3)
        cache: dict[str, torch.Tensor] = {}

        def encoded(text: str) -> Scheduled:
            return scheduled(models, text, steps, clip_skip, emphasis, cache)

        positives = [[(encoded(text), weight) for text, weight in split_and(prompt)] for prompt in prompts]
        negative = [encoded(text) for text in negatives]
        if pad_prompts:
            longest = max(context.shape[1] for context in cache.values())
            empty = encode_prompt(models, "", clip_skip, emphasis)
            for schedule_ in negative + [sub for subs in positives for sub, _ in subs]:
                schedule_.contexts = [padded(c, longest, empty) for c in schedule_.contexts]
        return cls(  # each prompt's schedules for each of its images, in order
            [n for n in negative for _ in range(images_per_prompt)],
            [p for p in positives for _ in range(images_per_prompt)],
            cfg_scale,
        )

    def __call__(self, unet, x: torch.Tensor, t, step: int) -> torch.Tensor:
        """The guided noise prediction for latents x [B, C, h, w] (already scaled for the sampler) at step `step`."""
        rows = [(b, sub.at(step)) for b, subs in enumerate(self.positives) for sub, _ in subs]
        if self.guided:
            rows = [(b, negative.at(step)) for b, negative in enumerate(self.negatives)] + rows
        eps = predict(unet, x, t, rows)
        if not self.guided:
            return eps
        eps_negative, rest = eps[: len(x)], list(eps[len(x) :])
        out = []
        for b, subs in enumerate(self.positives):
            shift = sum(weight * (rest.pop(0) - eps_negative[b]) for _, weight in subs)
            out.append(eps_negative[b] + self.cfg_scale * shift)
        return torch.stack(out)


def padded(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """context [1, 77 k, width] followed by copies of the empty prompt's chunk up to `length` tokens."""
    return torch.cat([context, empty.repeat(1, (length - context.shape[1]) // empty.shape[1], 1)], dim=1)


def predict(unet, x: torch.Tensor, t, rows: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The UNet's noise prediction for each row (image index, context): one call per distinct context length (the
    UNet takes any number of context tokens, but a batch needs one), the results in the rows' order."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    for length in dict.fromkeys(context.shape[1] for _, context in rows):
        picked = [k for k, (_, context) in enumerate(rows) if context.shape[1] == length]
        latents = x[[rows[k][0] for k in picked]]
        contexts = torch.cat([rows[k][1] for k in picked])
        for k, eps in zip(picked, unet(latents, t, contexts)):
            out[k] = eps
    return torch.stack(out)
