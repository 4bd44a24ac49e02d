"""Token merging for Stable Diffusion (ToMe, Bolya & Hoffman 2023): self-attention at the UNet's top level attends
over fewer tokens, the most similar ones merged (averaged), and every token gets its merged token's result back.

For each transformer block at the merged levels, the tokens split into destinations (the top-left pixel of every
2x2 cell; pixels outside whole cells are sources) and sources. Each source finds its most similar destination
(cosine similarity of the block's input tokens); the `ratio * tokens` sources with the best matches are averaged
into their destinations, the rest stay. Self-attention runs on what is left; unmerging copies each merged source's
destination result back to it. As the `tomesd` package with `use_rand=False` (A1111's default: a fixed
destination per cell, so the result does not depend on a random generator), merging for self-attention only.
"""

import contextlib

import torch

from sd.diffusion import Downsample, SpatialTransformer, UNet, Upsample


def levels(unet: UNet) -> dict[SpatialTransformer, int]:
    """Each spatial transformer's level: how many times the latents were halved before it."""
    out, level = {}, 0
    for block in unet.input_blocks:
        for layer in block:
            level += isinstance(layer, Downsample)
            if isinstance(layer, SpatialTransformer):
                out[layer] = level
    out.update({layer: level for layer in unet.middle_block if isinstance(layer, SpatialTransformer)})
    for block in unet.output_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                out[layer] = level
            level -= isinstance(layer, Upsample)
    return out


def unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def matching(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2, sy: int = 2):
    """(merge, unmerge) for tokens [B, h*w, C] in raster order, merging r sources into destinations by `metric`."""
    b, n, _ = metric.shape
    if r <= 0:
        return unchanged, unchanged
    cells = torch.zeros(h, w, dtype=torch.int64, device=metric.device)
    cells[: h - h % sy : sy, : w - w % sx : sx] = -1  # the destinations: each whole cell's top-left
    order = cells.flatten().argsort()[None, :, None]  # [1, n, 1]: destinations first, then sources
    destinations = (cells == -1).sum().item()
    src_idx, dst_idx = order[:, destinations:], order[:, :destinations]

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return x.gather(1, src_idx.expand(b, -1, c)), x.gather(1, dst_idx.expand(b, -1, c))

    with torch.no_grad():
        sources, targets = split(metric / metric.norm(dim=-1, keepdim=True))
        r = min(sources.shape[1], r)
        best, best_target = (sources @ targets.transpose(-1, -2)).max(dim=-1)  # [B, sources]
        ranked = best.argsort(dim=-1, descending=True)[..., None]  # [B, sources, 1]
        kept, merged = ranked[:, r:], ranked[:, :r]
        into = best_target[..., None].gather(1, merged)  # [B, r, 1]: each merged source's destination

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        c = x.shape[-1]
        unmerged = src.gather(1, kept.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, into.expand(-1, -1, c), src.gather(1, merged.expand(-1, -1, c)), reduce="mean")
        return torch.cat([unmerged, dst], dim=1)  # [B, n - r, C]

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c, stay = x.shape[-1], kept.shape[1]
        unmerged, dst = x[:, :stay], x[:, stay:]
        out = torch.zeros(b, n, c, device=x.device, dtype=x.dtype)
        positions = src_idx.expand(b, -1, 1)
        out.scatter_(1, dst_idx.expand(b, -1, c), dst)
        out.scatter_(1, positions.gather(1, kept).expand(-1, -1, c), unmerged)
        out.scatter_(1, positions.gather(1, merged).expand(-1, -1, c), dst.gather(1, into.expand(-1, -1, c)))
        return out

    return merge, unmerge


@contextlib.contextmanager
def token_merging(unet: UNet, ratio: float, max_level: int = 0):
    """Merges `ratio` of the tokens (0 to 0.75) before self-attention in the transformer blocks at levels up to
    `max_level` (0: the top level only, tomesd's max_downsample 1) while the block runs."""
    if not 0 <= ratio <= 0.75:
        raise ValueError(f"the token merging ratio must be between 0 and 0.75 (3 of each 4 tokens), got {ratio}")
    grids: dict[SpatialTransformer, tuple[int, int]] = {}
    undo = contextlib.ExitStack()
    with undo:
        for transformer, level in levels(unet).items():
            if level > max_level:
                continue
            record = lambda module, args: grids.__setitem__(module, tuple(args[0].shape[-2:]))  # noqa: E731
            undo.enter_context(transformer.register_forward_pre_hook(record))
            for block in transformer.transformer_blocks:
                block.token_merge = lambda x, t=transformer: matching(x, *grids[t], int(x.shape[1] * ratio))
                undo.callback(setattr, block, "token_merge", None)
        yield
