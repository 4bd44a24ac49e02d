"""How much memory a generation will need, estimated before anything is loaded, so that a size or batch that cannot
fit is refused at once, naming the option that would make it fit, instead of failing after loading and sampling.

The estimate is the networks' weights plus the largest working set of the three stages that hold activations:

    UNet       about 48 x channels x bytes per latent pixel and image (attention runs through SDPA's
               memory-efficient kernels: its memory grows with the tokens, not their square)
    VAE        about 7 x channels x bytes per pixel and image, plus the mid-block's single-head attention scores,
               latent pixels squared (or times --attention-chunk); with --tile-vae, per tile

measured with peak RSS on CPU float32 and rounded up; bench/results/memory.md has whole decodes.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30


@dataclass(frozen=True)
class Widths:
    """What the estimate needs of a checkpoint: the VAE's and the UNet's base channels, the pixels per latent, the
    size of its weights on disk, and the side it draws by default."""

    vae_channels: int = 128
    unet_channels: int = 320
    pixels_per_latent: int = 8
    weight_bytes: int = 0
    image_size: int = 512


def peek(path: Path) -> Widths:
    """The widths of a checkpoint from its safetensors header alone (no tensor is read); SD v1's for anything else."""
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    except (OSError, ValueError, struct.error, UnicodeDecodeError, MemoryError, OverflowError):
        return Widths(weight_bytes=size)
    metadata = header.pop("__metadata__", None) or {}
    try:
        configs = json.loads(metadata.get("configs", "{}"))
        unet = configs.get("diffusion", configs.get("unet", {}))
        vae = configs.get("vae", {})
        image_size = int(metadata.get("image_size", 512))
        if unet and vae:
            return Widths(vae["channels"], unet["channels"], 2 ** (len(vae["channel_mult"]) - 1), size, image_size)
        levels = {key.split(".")[3] for key in header if key.startswith("first_stage_model.decoder.up.")}
        return Widths(
            header["first_stage_model.decoder.conv_out.weight"]["shape"][1],
            header["model.diffusion_model.input_blocks.0.0.weight"]["shape"][0],
            2 ** (len(levels) - 1),
            size,
            image_size,
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return Widths(weight_bytes=size)


def estimate(
    widths: Widths,
    width: int,
    height: int,
    images: int,
    guided: bool,
    dtype: torch.dtype,
    vae_tile: int | None = None,
    attention_chunk: int | None = None,
) -> dict[str, int]:
    """Bytes by what holds them: "weights", "UNet" (activations of one step), "VAE" (of the decode)."""
    b = torch.finfo(dtype).bits // 8
    latent_pixels = (width // widths.pixels_per_latent) * (height // widths.pixels_per_latent)
    unet = 48 * widths.unet_channels * b * latent_pixels * images * (2 if guided else 1)
    tile_pixels = min(width * height, vae_tile**2) if vae_tile else width * height
    tile_latents = tile_pixels // widths.pixels_per_latent**2
    scores = tile_latents * min(tile_latents, attention_chunk or tile_latents) * b
    vae = images * (7 * widths.vae_channels * b * tile_pixels + scores)
    return {"weights": widths.weight_bytes, "UNet": unet, "VAE": vae}


def available(device: torch.device) -> int | None:
    """Bytes free for a generation on `device`, where that can be known: free GPU memory, or the memory Linux says
    is available without swapping."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(needs: dict[str, int], free: int | None, hints: list[str]) -> None:
    """A ValueError naming what does not fit and `hints` (what would make it fit) when `needs` exceed `free`."""
    total = sum(needs.values())
    if free is None or total <= free:
        return
    parts = ", ".join(f"{name} {size / GIB:,.1f}" for name, size in needs.items())
    raise ValueError(
        f"this generation needs about {total / GIB:,.1f} GiB ({parts}) and {free / GIB:,.1f} GiB are free; "
        + " or ".join(hints)
    )
