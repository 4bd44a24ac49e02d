"""DeepCache (Ma et al. 2024): between full UNet passes, recompute only the shallow branch and reuse the deep
features of the last full pass, which change little from one step to the next.

Skip branch k joins `input_blocks[k]` to its mirror output block, `output_blocks[-1 - k]`: branch 0, the shallowest,
the first conv to the last output block (the numbering of the reference's `cache_branch_id` for SD v1). Every
`interval` steps (and at the first) the whole UNet runs, and the input of the branch's output block, h, is kept; at
the steps between only `input_blocks[:k + 1]` and `output_blocks[-1 - k:]` run, from the kept h. interval 1 is the
plain UNet, call for call.
"""

import torch

from sd.diffusion import UNet
from sd.sampling import CURRENT_STEP


class DeepCache:
    """Called as the UNet is, (latents, timesteps, context) -> noise, inside a generation (sd.pipeline.denoise)."""

    def __init__(self, unet: UNet, interval: int, branch: int = 0):
        last = len(unet.input_blocks) - 1
        if interval < 1:
            raise ValueError(f"DeepCache's interval is a number of steps, 1 or more; got {interval}")
        if not 0 <= branch <= last:
            raise ValueError(f"DeepCache's branch must be between 0 and {last} for this UNet, got {branch}")
        self.unet, self.interval, self.branch = unet, interval, branch
        self.kept: dict[tuple, torch.Tensor] = {}  # per UNet call of a step (one per context length): the deep h

    def __call__(self, latents: torch.Tensor, timesteps, context: torch.Tensor) -> torch.Tensor:
        unet, shallow = self.unet, self.branch + 1  # input blocks 0 .. branch
        step = CURRENT_STEP.get()
        key = (tuple(latents.shape), context.shape[1])
        full = step is None or step[0] % self.interval == 0 or key not in self.kept
        emb = unet.embed(timesteps, latents)
        skips = unet.down(latents, emb, context, unet.input_blocks[:shallow])
        outputs = len(unet.output_blocks) - shallow  # the output blocks of the deep part
        if full:
            skips += unet.down(skips[-1], emb, context, unet.input_blocks[shallow:])
            h = unet.run(unet.middle_block, skips[-1], emb, context)
            self.kept[key] = h = unet.up(h, skips, emb, context, unet.output_blocks[:outputs])
        else:
            h = self.kept[key]
        return unet.out(unet.up(h, skips, emb, context, unet.output_blocks[outputs:]))
