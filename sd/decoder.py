"""The KL autoencoder's decoder: an (unscaled) latent -> an image in [-1, 1], 8x larger.

The mirror of the encoder, one more ResNet block per level. Module names follow the public checkpoint
(`first_stage_model.decoder.*`, `first_stage_model.post_quant_conv`); as there, `up[i]` is the level that works at
the resolution of the encoder's `down[i]`, so the levels run in reverse order.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sd.autoencoder import MidBlock, ResnetBlock, VAEConfig


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * (cfg.num_res_blocks + 1)
        self.block = nn.ModuleList(ResnetBlock(a, b, cfg) for a, b in zip(widths, widths[1:]))
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        chs = cfg.level_channels
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.mid = MidBlock(chs[-1], cfg)
        # level i takes the output of level i+1 (the deepest takes the middle block's) and upsamples unless it is
        # the last to run, level 0
        self.up = nn.ModuleList(
            UpLevel(c_in, c_out, cfg, upsample=i > 0) for i, (c_in, c_out) in enumerate(zip(chs[1:] + chs[-1:], chs))
        )
        self.norm_out = nn.GroupNorm(32, chs[0], eps=cfg.eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, 4, h, w], unscaled latents -> images [B, 3, 8h, 8w], in [-1, 1] for a trained model (unclamped)."""
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
