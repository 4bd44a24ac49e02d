"""The KL autoencoder (VAE) that moves Stable Diffusion between pixels and latents: its config, the blocks its
encoder and decoder share, and the posterior's sample. Module names follow the public checkpoint
(`first_stage_model.*`); the encoder is `sd/encoder.py`, the decoder `sd/decoder.py`.
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
    # SD v1's latents are the posterior's samples times this, which gives them unit variance (diffusers' name)
    scaling_factor: float = 0.18215

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Same depth and downsampling (8x) as SD's, a fraction of the width: for tests."""
        return cls(channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)

    @property
    def level_channels(self) -> list[int]:
        return [self.channels * m for m in self.channel_mult]

    @property
    def pixels_per_latent(self) -> int:
        """How many pixels one latent stands for, along each side: 8 for SD v1."""
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


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from the encoder's Gaussian posterior q(z | x) = N(mean, exp(logvar)), given standard normal noise;
    unscaled (times `VAEConfig.scaling_factor` it is an SD latent)."""
    return mean + torch.exp(0.5 * logvar) * noise
