"""Attention, the one operation every network of Stable Diffusion shares.

All of it goes through `torch.nn.functional.scaled_dot_product_attention`, which picks the fastest kernel the
device has (flash / memory-efficient / math) and never materialises more than it must. The one exception is a UNet
attention layer with a `probe` (set by sd/study.py): its probabilities are also computed explicitly, for the probe
to look at or replace.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False, chunk: int | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v, per head.

    q: [B, Tq, C], k and v: [B, Tk, C] with C = heads * d. Returns [B, Tq, C]. `chunk` (non-causal only): attend
    that many queries at a time, bounding the attention scores' memory where the kernel would hold all of them.
    """
    b, tq, c = q.shape
    q, k, v = (x.unflatten(-1, (heads, c // heads)).transpose(1, 2) for x in (q, k, v))  # [B, heads, tokens, d]
    if chunk and tq > chunk and not causal:
        out = torch.cat(
            [F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v) for i in range(0, tq, chunk)], dim=2
        )
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, heads, Tq, d]
    return out.transpose(1, 2).reshape(b, tq, c)  # [B, Tq, heads * d]


def probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: q [B, Tq, C], k [B, Tk, C] -> [B, heads, Tq, Tk]."""
    q, k = (x.float().unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2) for x in (q, k))  # [B, heads, T, d]
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Given probabilities [B, heads, Tq, Tk] and values [B, Tk, C] -> [B, Tq, C]."""
    b, heads, tq, _ = probs.shape
    v = v.unflatten(-1, (heads, v.shape[-1] // heads)).transpose(1, 2)  # [B, heads, Tk, d]
    return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, tq, -1)  # [B, Tq, heads * d]


def set_attention_chunk(model: nn.Module, chunk: int | None) -> None:
    """Attention slicing: every UNet and VAE attention in `model` attends `chunk` queries at a time (None: all)."""
    for module in model.modules():
        if isinstance(module, (CrossAttention, SpatialSelfAttention)):
            module.chunk = chunk


class CrossAttention(nn.Module):
    """The UNet's attention: self-attention when `context` is None, else queries from x and keys/values from context.

    Names follow the public checkpoint (`to_q`, `to_k`, `to_v`, `to_out.0`); the projections have no bias but the
    output. x: [B, T, dim], context: [B, S, context_dim] -> [B, T, dim].
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        if dim % heads:
            raise ValueError(f"{dim} channels do not split into {heads} attention heads")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # a Sequential only to keep the checkpoint's `to_out.0`
        self.chunk: int | None = None
        # probs [B, heads, Tq, Tk] -> None (keep them) or replacement probabilities; sd/study.py sets it
        self.probe: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        replaced = None if self.probe is None else self.probe(probabilities(q, k, self.heads))
        if replaced is None:  # the kernel's own numbers, as without a probe
            return self.to_out(attention(q, k, v, self.heads, chunk=self.chunk))
        return self.to_out(attend(replaced, v))


class SpatialSelfAttention(nn.Module):
    """The autoencoder's single-head self-attention over all pixels, with a residual connection.

    q, k, v and the output projection are 1x1 convolutions, as in the public checkpoint. x: [B, C, H, W] -> same.
    """

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.chunk: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, H*W, C]
        out = attention(q, k, v, heads=1, chunk=self.chunk)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))  # back to [B, C, H, W]
