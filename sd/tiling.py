"""Running a network over an image in overlapping tiles, so that memory follows the tile, not the image: how the
VAE encodes and decodes images larger than fit at once."""

import torch


def tiled(fn, x: torch.Tensor, tile: int, factor: float) -> torch.Tensor:
    """fn applied to overlapping tile x tile windows of x [B, C, H, W] (overlap: a quarter tile), the outputs
    blended with linear ramps across the overlaps so no seam shows. fn maps a window to `factor` times its size.
    Memory then follows the tile, not the image."""
    overlap = tile // 4

    def origins(n: int) -> list[int]:
        return sorted({min(p, max(n - tile, 0)) for p in range(0, max(n - tile, 0) + tile - overlap, tile - overlap)})

    def ramp(start: int, length: int, n: int) -> torch.Tensor:
        """1 inside; across each overlap that meets another tile, 0 for the outer quarter (where a tile's own edge
        spoils its output) then rising linearly: the two tiles' weights sum to 1 everywhere in the overlap."""
        out_len, out_overlap = int(length * factor), int(overlap * factor)
        margin = out_overlap // 4
        rise = ((torch.arange(out_overlap) - margin + 1) / (out_overlap - 2 * margin + 1)).clamp(0, 1)
        weight = torch.ones(out_len)
        if start > 0:
            weight[:out_overlap] = rise
        if start + length < n:
            weight[-out_overlap:] = torch.minimum(weight[-out_overlap:], rise.flip(0))
        return weight

    h, w = x.shape[-2:]
    out = total = None
    for y in origins(h):
        for x0 in origins(w):
            window = x[..., y : y + tile, x0 : x0 + tile]
            piece = fn(window)
            weight = (ramp(y, window.shape[-2], h)[:, None] * ramp(x0, window.shape[-1], w)[None]).to(piece)
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], int(h * factor), int(w * factor))
                total = piece.new_zeros(int(h * factor), int(w * factor))
            oy, ox = int(y * factor), int(x0 * factor)
            out[..., oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += piece * weight
            total[oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += weight
    return out / total
