"""Text-to-image and image-to-image: the prompt through CLIP, noise through the UNet and a sampler, latents through
the VAE decoder.

Seeds reproduce diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline run with
`generator=torch.Generator("cpu").manual_seed(seed)`: the same random numbers are drawn in the same order (the VAE
posterior sample and the starting noise for image-to-image, the initial latents for text-to-image, then each
stochastic sampler step's noise), always in float32 on the CPU, so a seed gives the same image on any device.
"""

import contextlib
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sd.model_loader import Models
from sd.samplers import Sampler, make_sampler, noise, noise_like

LATENT_SCALE = 0.18215  # SD v1's latents are the VAE's posterior, scaled to unit variance by this factor
OUTPUT_TYPES = ("pil", "tensor", "latent")


@dataclass
class Generated:
    """What `generate` made: `images` (PIL images, a [B, 3, H, W] tensor in [0, 1], or the final [B, 4, h, w]
    latents), the seed it used, and every setting, for PNG metadata."""

    images: list[Image.Image] | torch.Tensor
    seed: int
    settings: dict = field(default_factory=dict)


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            hint = f" (try {lower} or {upper})" if lower > 0 else " (try 8 or more)"
            raise ValueError(f"{name} must be a positive multiple of 8, got {value}{hint}")


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image from a path or a PIL image; a missing or unreadable file is a one-line ValueError."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"init image {path}: no such file")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"init image {path}: not a readable image ({error})") from None


def image_to_tensor(image: Image.Image, width: int | None, height: int | None) -> torch.Tensor:
    """A PIL image -> [1, 3, H, W] in [-1, 1], resized (Lanczos, as diffusers) to width x height if given, else to
    its own size rounded down to multiples of 8, saying so when it changes."""
    size = (width or image.width - image.width % 8, height or image.height - image.height % 8)
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"init image is {image.width}x{image.height}; it needs at least 8x8 pixels")
    if size != image.size:
        print(
            f"init image resized from {image.width}x{image.height} to {size[0]}x{size[1]} "
            "(sides must be multiples of 8)"
        )
        image = image.resize(size, resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images, rounding to 8 bits as diffusers does."""
    array = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def encode_prompts(models: Models, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """Prompts -> CLIP context [len(prompts), 77, width] on the networks' device and dtype."""
    tokens = models.tokenizer(prompts).to(models.clip.embeddings.token_embedding.weight.device)
    return models.clip(tokens, clip_skip=clip_skip)


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


def encode(models: Models, images: torch.Tensor, tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> the posterior's (mean, logvar), unscaled; `tile`: in tile x tile pixel windows."""
    if tile is None or max(images.shape[-2:]) <= tile:
        return models.encoder(images)
    moments = tiled(lambda t: torch.cat(models.encoder(t), dim=1), images, tile, 1 / models.encoder.cfg.scale_factor)
    return moments.chunk(2, dim=1)


def decode(models: Models, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]; `tile`: in tile x tile pixel windows. SD's VAE can overflow in float16
    (NaN, black images): then the decoder moves to float32 for good, with a message, and decodes again."""
    factor = models.encoder.cfg.scale_factor

    def run(z: torch.Tensor) -> torch.Tensor:
        if tile is None or max(z.shape[-2:]) * factor <= tile:
            return models.decoder(z)
        return tiled(models.decoder, z, tile // factor, factor)

    images = run(latents / LATENT_SCALE)
    if not torch.isfinite(images).all() and latents.dtype == torch.float16:
        warnings.warn("the VAE decoder overflowed in float16; decoding in float32 from now on", stacklevel=3)
        models.decoder.float()
        images = run(latents.float() / LATENT_SCALE)
    return images


@contextlib.contextmanager
def placed(network: torch.nn.Module, device: torch.device):
    """The network on `device` for the block's duration, then back where it was (low-VRAM offloading)."""
    home = next(network.parameters()).device
    if home != device:
        network.to(device)
    try:
        yield network
    finally:
        if home != device:
            network.to(home)


@torch.inference_mode()
def generate(
    prompt: str | list[str],
    models: Models,
    negative_prompt: str | list[str] = "",
    sampler: str | Sampler = "euler_a",
    steps: int = 20,
    cfg_scale: float = 7.5,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    init_image: str | Path | Image.Image | None = None,
    strength: float = 0.75,
    clip_skip: int = 1,
    latents: torch.Tensor | None = None,
    output_type: str = "pil",
    progress: bool = True,
    karras: bool = False,
    eta: float = 0.0,
    device: str | torch.device | None = None,
    vae_tile: int | None = None,
) -> Generated:
    """Images for a prompt (or a list of prompts, `batch_size` images each).

    sampler: ddpm, ddim, plms, euler, euler_a, lms, dpmpp_2m (or a Sampler); karras: their Karras sigma schedule;
    eta: DDIM's noise. cfg_scale: classifier-free guidance (1 or less: none, the negative prompt is unused).
    width, height: multiples of 8; default 512, or for image-to-image the init image's size rounded down to 8s.
    init_image: image-to-image from this image (a path or PIL image), noised as for `strength` of the steps (0
    keeps it, 1 starts from pure noise). latents: the initial noise, [B, 4, h, w], instead of drawing it.
    output_type: "pil", "tensor" ([B, 3, H, W] in [0, 1], on the CPU) or "latent" (final latents, undecoded).
    device: where to compute (default: where the UNet is); a network kept elsewhere (say on the CPU, to save GPU
    memory) is moved there for its turn only. vae_tile: encode and decode in overlapping tiles of this many pixels.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    if models.diffusion.cfg.in_channels != models.encoder.cfg.latent_channels:
        raise ValueError("an inpainting checkpoint needs a mask; this pipeline does text-to-image and image-to-image")
    sampler = make_sampler(sampler, karras=karras, eta=eta) if isinstance(sampler, str) else sampler
    seed = random.randrange(2**32) if seed is None else seed
    generator = torch.Generator("cpu").manual_seed(seed)
    weight = models.diffusion.out[2].weight
    device, dtype = torch.device(device) if device is not None else weight.device, weight.dtype
    total = len(prompts) * batch_size

    guided = cfg_scale > 1
    with placed(models.clip, device):
        context = encode_prompts(models, (negatives + prompts) if guided else prompts, clip_skip)
    context = context.repeat_interleave(batch_size, dim=0)  # [negatives..., prompts...], each batch_size times
    # image-to-image: diffusers' strength, the last strength * steps steps
    start = 0 if init_image is None else steps - min(int(steps * strength), steps)
    sampler.set_steps(steps, start)

    if init_image is None:
        width, height = 512 if width is None else width, 512 if height is None else height
        check_size(width, height)
        factor = models.encoder.cfg.scale_factor
        shape = (total, models.encoder.cfg.latent_channels, height // factor, width // factor)
        if latents is None:
            latents = noise(shape, generator, device, dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        x = latents.to(device, dtype) * sampler.init_noise_sigma
    else:
        if latents is not None:
            raise ValueError("latents= gives text-to-image its starting noise; image-to-image starts from init_image")
        check_size(8 if width is None else width, 8 if height is None else height)  # the image's own are rounded down
        image = image_to_tensor(open_image(init_image), width, height).to(device, dtype)
        height, width = image.shape[-2:]
        with placed(models.encoder, device):
            mean, logvar = encode(models, image, vae_tile)
        x0 = LATENT_SCALE * (mean + torch.exp(0.5 * logvar) * noise_like(mean, generator))  # the posterior's sample
        x0 = x0.repeat(total, 1, 1, 1)
        x = sampler.add_noise(x0, noise_like(x0, generator), start) if start < len(sampler.timesteps) else x0

    with placed(models.diffusion, device):
        for i in tqdm(range(start, len(sampler.timesteps)), desc=sampler.label, disable=not progress):
            model_input = sampler.scale_input(torch.cat([x, x]) if guided else x, i)
            eps = models.diffusion(model_input, sampler.timesteps[i], context)
            if guided:
                eps_negative, eps_prompt = eps.chunk(2)
                eps = eps_negative + cfg_scale * (eps_prompt - eps_negative)
            x = sampler.step(eps, i, x, generator)

    settings = {
        "prompts": prompts,
        "negative_prompts": negatives,
        "sampler": sampler.label,
        "karras": sampler.karras,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "width": width,
        "height": height,
        "clip_skip": clip_skip,
        "batch_size": batch_size,
    }
    if init_image is not None:
        settings["strength"] = strength
    if output_type == "latent":
        return Generated(x, seed, settings)
    with placed(models.decoder, device):
        images = (decode(models, x, vae_tile) / 2 + 0.5).clamp(0, 1).float().cpu()
    return Generated(to_pil(images) if output_type == "pil" else images, seed, settings)


class StableDiffusion:
    """The object API: `StableDiffusion.from_checkpoint(path).txt2img("a lighthouse at dusk")` -> PIL images."""

    def __init__(self, models: Models):
        self.models = models

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, **kwargs) -> "StableDiffusion":
        """Any checkpoint `load_models` reads; kwargs: ema, vae."""
        from sd.model_loader import load_models

        return cls(load_models(path, device=device, dtype=dtype, **kwargs))

    def txt2img(self, prompt: str | list[str], **kwargs) -> list[Image.Image]:
        """kwargs: those of `generate` (negative_prompt, sampler, steps, cfg_scale, seed, width, height, ...)."""
        return generate(prompt, self.models, **kwargs).images

    def img2img(self, image, prompt: str | list[str], strength: float = 0.75, **kwargs) -> list[Image.Image]:
        return generate(prompt, self.models, init_image=image, strength=strength, **kwargs).images
