"""The KL autoencoder's encoder: an image in [-1, 1] -> the Gaussian posterior over its latent, 8x smaller.

Module names follow the public checkpoint (`first_stage_model.encoder.*`, `first_stage_model.quant_conv`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from sd.autoencoder import MidBlock, ResnetBlock, VAEConfig


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The padding is one pixel on the right and bottom only, as the checkpoints were trained."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * cfg.num_res_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, cfg) for a, b in zip(widths, widths[1:]))
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        chs = cfg.level_channels
        self.conv_in = nn.Conv2d(cfg.image_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(c_in, c_out, cfg, downsample=i < len(chs) - 1)
            for i, (c_in, c_out) in enumerate(zip(chs[:1] + chs, chs))
        )
        self.mid = MidBlock(chs[-1], cfg)
        self.norm_out = nn.GroupNorm(32, chs[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, ceil(H/8), ceil(W/8)], unscaled.

        logvar is clamped to [-30, 20] as the reference posterior does, so exp() never overflows.
        """
        h = self.conv_in(images)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)
