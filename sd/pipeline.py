"""Text-to-image and image-to-image, as four stages that `generate` composes:

    context = encode_prompts(...)    the prompts through CLIP (with guidance, the negative prompts first)
    x = initial_noise(...)           text-to-image: the starting noise; image-to-image: noised_image(...), the init
                                     image's latents noised to the level where sampling starts
    x = denoise(...)                 the sampler's loop; classifier-free guidance in guided_noise
    images = decode(models, x)       the VAE decoder

Seeds reproduce diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline run with
`generator=torch.Generator("cpu").manual_seed(seed)`: the same random numbers are drawn in the same order (the VAE
posterior sample and the starting noise for image-to-image, the initial latents for text-to-image, then each
stochastic sampler step's noise), always in float32 on the CPU, so a seed gives the same image on any device.
"""

import contextlib
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from sd.autoencoder import sample_posterior
from sd.images import check_size, image_to_tensor, open_image, to_pil
from sd.model_loader import load_models
from sd.models import Models
from sd.samplers import make_sampler
from sd.sampling import Sampler, noise, noise_like
from sd.tiling import tiled

OUTPUT_TYPES = ("pil", "tensor", "latent")


@dataclass
class Parameters:
    """Every setting a generation used: what the CLI writes into each PNG as A1111's `parameters` text."""

    prompts: list[str]
    negative_prompts: list[str]
    sampler: str  # its A1111 label ("Euler a")
    karras: bool
    eta: float
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    clip_skip: int
    batch_size: int  # images per prompt
    strength: float | None = None  # image-to-image only


@dataclass
class Generated:
    """What `generate` made: `images` (PIL images, a [B, 3, H, W] tensor in [0, 1], or the final [B, 4, h, w]
    latents) and the parameters that made them."""

    images: list[Image.Image] | torch.Tensor
    parameters: Parameters

    @property
    def seed(self) -> int:
        return self.parameters.seed


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
    check_arguments(models, prompts, negatives, steps, batch_size, strength, output_type, init_image, latents)
    image, width, height = starting_image(init_image, width, height)
    sampler = make_sampler(sampler, karras=karras, eta=eta) if isinstance(sampler, str) else sampler
    seed = random.randrange(2**32) if seed is None else seed
    generator = torch.Generator("cpu").manual_seed(seed)
    device = models.device if device is None else torch.device(device)
    total = len(prompts) * batch_size
    start = 0 if image is None else first_step(steps, strength)
    sampler.set_steps(steps, start)

    guided = cfg_scale > 1
    with placed(models.clip, device):
        context = encode_prompts(models, (negatives + prompts) if guided else prompts, clip_skip)
    context = context.repeat_interleave(batch_size, dim=0)  # [negatives..., prompts...], each batch_size times
    if image is None:
        x = initial_noise(models, sampler, total, width, height, latents, generator, device)
    else:
        with placed(models.encoder, device):
            x = noised_image(models, sampler, image.to(device, models.dtype), total, start, generator, vae_tile)
    with placed(models.diffusion, device):
        x = denoise(models.diffusion, sampler, x, context, cfg_scale, generator, start, progress)

    parameters = Parameters(
        prompts=prompts,
        negative_prompts=negatives,
        sampler=sampler.label,
        karras=sampler.karras,
        eta=sampler.eta,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        width=width,
        height=height,
        clip_skip=clip_skip,
        batch_size=batch_size,
        strength=None if image is None else strength,
    )
    if output_type == "latent":
        return Generated(x, parameters)
    with placed(models.decoder, device):
        images = (decode(models, x, vae_tile) / 2 + 0.5).clamp(0, 1).float().cpu()
    return Generated(to_pil(images) if output_type == "pil" else images, parameters)


def check_arguments(
    models: Models, prompts, negatives, steps, batch_size, strength, output_type, init_image, latents
) -> None:
    """What generate() can refuse before any work: one ValueError naming the argument."""
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
    if init_image is not None and latents is not None:
        raise ValueError("latents= gives text-to-image its starting noise; image-to-image starts from init_image")


def starting_image(init_image, width: int | None, height: int | None) -> tuple[torch.Tensor | None, int, int]:
    """(the init image as [1, 3, H, W] in [-1, 1], or None; the size to draw): width x height, by default 512 x 512,
    or for image-to-image the image's own size rounded down to multiples of 8."""
    if init_image is None:
        width, height = 512 if width is None else width, 512 if height is None else height
        check_size(width, height)
        return None, width, height
    check_size(8 if width is None else width, 8 if height is None else height)  # before opening the image
    image = image_to_tensor(open_image(init_image), width, height)
    return image, image.shape[-1], image.shape[-2]


# -- the stages ---------------------------------------------------------------------------------------------------


def encode_prompts(models: Models, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """Prompts -> CLIP context [len(prompts), 77, width] on the networks' device and dtype."""
    tokens = models.tokenizer(prompts).to(models.clip.embeddings.token_embedding.weight.device)
    return models.clip(tokens, clip_skip=clip_skip)


def first_step(steps: int, strength: float) -> int:
    """Image-to-image runs the last `strength` of the schedule's steps (diffusers' rule): the index it starts at."""
    return steps - min(int(steps * strength), steps)


def initial_noise(
    models: Models, sampler: Sampler, total: int, width: int, height: int, latents, generator, device
) -> torch.Tensor:
    """Text-to-image's start: pure noise at the sampler's first noise level (`latents`, if given, as the noise)."""
    factor = models.encoder.cfg.pixels_per_latent
    shape = (total, models.encoder.cfg.latent_channels, height // factor, width // factor)
    if latents is None:
        latents = noise(shape, generator, device, models.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
    return latents.to(device, models.dtype) * sampler.init_noise_sigma


def noised_image(
    models: Models, sampler: Sampler, image: torch.Tensor, total: int, start: int, generator, vae_tile
) -> torch.Tensor:
    """Image-to-image's start: a sample of the image's latent posterior, `total` times, noised to the level of
    step `start` (no noise when no step is left to take)."""
    mean, logvar = encode(models, image, vae_tile)
    x0 = models.encoder.cfg.scaling_factor * sample_posterior(mean, logvar, noise_like(mean, generator))
    x0 = x0.repeat(total, 1, 1, 1)
    return sampler.add_noise(x0, noise_like(x0, generator), start) if start < len(sampler.timesteps) else x0


def denoise(
    unet,
    sampler: Sampler,
    x: torch.Tensor,
    context: torch.Tensor,
    cfg_scale: float,
    generator: torch.Generator,
    start: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """The sampling loop from step `start` on: the guided noise prediction, then the sampler's step. `unet` is
    whatever predicts the noise, called as the UNet is, (latents, timestep, context): where per-step features
    (hooks, caches) attach."""
    for i in tqdm(range(start, len(sampler.timesteps)), desc=sampler.label, disable=not progress):
        eps = guided_noise(unet, sampler.scale_input(x, i), sampler.timesteps[i], context, cfg_scale)
        x = sampler.step(eps, i, x, generator)
    return x


def guided_noise(unet, x: torch.Tensor, t, context: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps(x | negative) + cfg (eps(x | prompt) - eps(x |
    negative)), both predictions in one batch, the context's first half the negative prompts'. cfg_scale <= 1: the
    prompt's prediction alone (the context holds only the prompts)."""
    if cfg_scale <= 1:
        return unet(x, t, context)
    eps_negative, eps_prompt = unet(torch.cat([x, x]), t, context).chunk(2)
    return eps_negative + cfg_scale * (eps_prompt - eps_negative)


def encode(models: Models, images: torch.Tensor, tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> the posterior's (mean, logvar), unscaled; `tile`: in tile x tile pixel windows."""
    if tile is None or max(images.shape[-2:]) <= tile:
        return models.encoder(images)
    factor = 1 / models.encoder.cfg.pixels_per_latent
    moments = tiled(lambda t: torch.cat(models.encoder(t), dim=1), images, tile, factor)
    return moments.chunk(2, dim=1)


def decode(models: Models, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]; `tile`: in tile x tile pixel windows. SD's VAE can overflow in float16
    (NaN, black images): then the decoder moves to float32 for good, with a message, and decodes again."""
    factor, scale = models.decoder.cfg.pixels_per_latent, models.decoder.cfg.scaling_factor

    def run(z: torch.Tensor) -> torch.Tensor:
        if tile is None or max(z.shape[-2:]) * factor <= tile:
            return models.decoder(z)
        return tiled(models.decoder, z, tile // factor, factor)

    images = run(latents / scale)
    if not torch.isfinite(images).all() and latents.dtype == torch.float16:
        warnings.warn("the VAE decoder overflowed in float16; decoding in float32 from now on", stacklevel=3)
        models.decoder.float()
        images = run(latents.float() / scale)
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


class StableDiffusion:
    """The object API: `StableDiffusion.from_checkpoint(path).txt2img("a lighthouse at dusk")` -> PIL images."""

    def __init__(self, models: Models):
        self.models = models

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, **kwargs) -> "StableDiffusion":
        """Any checkpoint `load_models` reads; kwargs: ema, vae."""
        return cls(load_models(path, device=device, dtype=dtype, **kwargs))

    def txt2img(self, prompt: str | list[str], **kwargs) -> list[Image.Image]:
        """kwargs: those of `generate` (negative_prompt, sampler, steps, cfg_scale, seed, width, height, ...)."""
        return generate(prompt, self.models, **kwargs).images

    def img2img(self, prompt: str | list[str], image, strength: float = 0.75, **kwargs) -> list[Image.Image]:
        """The prompt drawn into `image` (a path or PIL image); strength: how much of it to redraw, 0..1."""
        return generate(prompt, self.models, init_image=image, strength=strength, **kwargs).images
