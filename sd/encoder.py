"""The KL autoencoder's encoder: an image in [-1, 1] -> the Gaussian posterior over its latent, 8x smaller.

Also holds what the encoder and the decoder share: the config, the residual block and the middle block.
Module names follow the public checkpoint (`first_stage_model.encoder.*`, `first_stage_model.quant_conv`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd.attention import SpatialSelfAttention


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    eps: float = 1e-6
    dropout: float = 0.0

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Same depth and downsampling (8x) as SD's, a fraction of the width: for tests."""
        return cls(channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)

    @property
    def level_channels(self) -> list[int]:
        return [self.channels * m for m in self.channel_mult]

    @property
    def scale_factor(self) -> int:
        """How many pixels per latent, along each side: 8 for SD v1."""
        return 2 ** (len(self.channel_mult) - 1)


class ResnetBlock(nn.Module):
    """x + F(x), F = two (GroupNorm, SiLU, 3x3 conv) stages; a 1x1 conv on the skip path when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=cfg.eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class MidBlock(nn.Module):
    """ResNet block, self-attention over all pixels, ResNet block: at the lowest resolution, in both halves."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = SpatialSelfAttention(channels, eps=cfg.eps)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


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
