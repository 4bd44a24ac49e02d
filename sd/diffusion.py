"""The denoising UNet: eps_theta(z_t, t, c), the noise in latent z_t at timestep t given the prompt's context c.

A ResNet UNet (the DDPM/ADM design) with a spatial transformer after ResNet blocks at the upper levels, where the
pixels attend to each other (self-attention) and to the prompt (cross-attention). Each input block's output is
kept and concatenated to the input of its mirror output block.

Module names follow the public checkpoint (`model.diffusion_model.*`): `input_blocks`, `middle_block` and
`output_blocks` are flat lists of small sequences, numbered as there.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from sd.attention import CrossAttention


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for the inpainting model: latents, mask, masked-image latents
    out_channels: int = 4
    channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    dropout: float = 0.0

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """Every kind of block SD v1 has, at the same depth, 10x narrower: for tests. Context: the tiny CLIP's."""
        return cls(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, context_dim=128)

    @property
    def time_dim(self) -> int:
        return 4 * self.channels


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim], cosines first then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """x + F(x, t): GroupNorm-SiLU-conv, plus a per-channel shift from the timestep embedding, GroupNorm-SiLU-conv."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    """A GELU-gated linear unit: (x W) * gelu(x V), W and V stored as one projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the prompt, feed-forward. x: [B, T, dim]."""

    def __init__(self, dim: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, cfg.heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, cfg.heads, context_dim=cfg.context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, cfg.dropout)
        # token merging (sd/tome.py): x -> (merge, unmerge), fewer tokens for self-attention and back
        self.token_merge: Callable[[torch.Tensor], tuple[Callable, Callable]] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, pixels, dim] image tokens; context: [B, prompt tokens, context_dim] -> [B, pixels, dim]."""
        if self.token_merge is None:
            x = x + self.attn1(self.norm1(x))
        else:
            merge, unmerge = self.token_merge(x)
            x = x + unmerge(self.attn1(merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, as tokens, inside a residual connection."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, cfg) for _ in range(cfg.transformer_depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, h*w, C]: a token per pixel
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))  # back to [B, C, h, w]


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3x3 conv.

    `size` is the size of the skip connection this output will meet: twice the input for latents whose sides are
    multiples of 8, one less than twice where a stride-2 conv rounded an odd side up on the way down.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.Sequential):
    """One numbered entry of `input_blocks`/`output_blocks`: layers run in order, each given what it needs."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.time_embed = nn.Sequential(nn.Linear(ch, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))

        def block(in_ch: int, out_ch: int, level: int) -> list[nn.Module]:
            layers = [ResBlock(in_ch, out_ch, cfg)]
            if cfg.attention_levels[level]:
                layers.append(SpatialTransformer(out_ch, cfg))
            return layers

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(UNetBlock(*block(ch, mult * cfg.channels, level)))
                ch = mult * cfg.channels
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = UNetBlock(ResBlock(ch, ch, cfg), SpatialTransformer(ch, cfg), ResBlock(ch, ch, cfg))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = block(ch + skip_channels.pop(), mult * cfg.channels, level)
                ch = mult * cfg.channels
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.gradient_checkpointing = False  # in training: keep no activations inside blocks, recompute them

    def run(self, block: UNetBlock, *args, **kwargs) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents: [B, in_channels, h, w], timesteps: [B] or a scalar (int or float), context: [B, T, context_dim]
        -> predicted noise [B, out_channels, h, w]."""
        emb = self.embed(timesteps, latents)
        skips = self.down(latents, emb, context, self.input_blocks)
        h = self.run(self.middle_block, skips[-1], emb, context)
        return self.out(self.up(h, skips, emb, context, self.output_blocks))

    def embed(self, timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The timestep embedding, [B, time_dim], one per latent of the batch."""
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        return self.time_embed(timestep_embedding(t, self.cfg.channels).to(latents.dtype))

    def down(self, h: torch.Tensor, emb, context, blocks) -> list[torch.Tensor]:
        """Runs input `blocks` in turn from h; returns each one's output (the skip connections)."""
        skips = []
        for block in blocks:
            h = self.run(block, h, emb, context)
            skips.append(h)
        return skips

    def up(self, h: torch.Tensor, skips: list[torch.Tensor], emb, context, blocks) -> torch.Tensor:
        """Runs output `blocks` in turn from h, each on h and the last skip connection left (taken from `skips`)."""
        for block in blocks:
            h = self.run(
                block, torch.cat([h, skips.pop()], dim=1), emb, context, size=skips[-1].shape[-2:] if skips else None
            )
        return h
