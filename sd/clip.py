"""CLIP ViT-L/14 text encoder: the prompt's 77 tokens -> 77 context vectors the UNet attends to.

A pre-LayerNorm transformer with a causal mask (each token sees only the tokens before it) and quick-GELU.
Module names follow the public checkpoint (`cond_stage_model.transformer.text_model.*`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from sd.attention import attention


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    eps: float = 1e-5

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """A few narrow layers for tests; the real vocabulary, so the real tokenizer fits, and CLIP's 64-wide heads."""
        return cls(width=128, layers=3, heads=2, mlp_width=256)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: torch.Tensor, token_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """token_vectors [B, T, width]: the tokens' vectors, given instead of looked up (textual inversion)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        vectors = self.token_embedding(tokens) if token_vectors is None else token_vectors
        return vectors + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"CLIP's {cfg.width} channels do not split into {cfg.heads} attention heads")
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick-GELU, the approximation CLIP was trained with


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Runs the first `depth` layers."""
        for layer in self.layers[:depth]:
            x = layer(x)
        return x


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(
        self, tokens: torch.Tensor, clip_skip: int = 1, token_vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: LongTensor [B, T], T <= 77 -> final-layer-normed hidden states [B, T, width]; token_vectors, if
        given, are the tokens' input vectors (a textual-inversion embedding replaces some).

        clip_skip=k stops k-1 layers before the last (A1111's "Clip skip": 1 is the full model, 2 the penultimate
        layer, which some fine-tuned checkpoints were trained on); the final layer norm applies either way.
        """
        if not 1 <= clip_skip <= self.cfg.layers:
            raise ValueError(f"clip_skip must be between 1 and {self.cfg.layers}, got {clip_skip}")
        if tokens.shape[1] > self.cfg.max_positions:
            raise ValueError(f"at most {self.cfg.max_positions} tokens fit CLIP's positions, got {tokens.shape[1]}")
        x = self.encoder(self.embeddings(tokens, token_vectors), depth=self.cfg.layers - (clip_skip - 1))
        return self.final_layer_norm(x)
