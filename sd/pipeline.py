"""Text-to-image, image-to-image and inpainting, as four stages that `generate` composes:

    guidance = Guidance.build(...)   the prompts (A1111's syntax) through CLIP, as contexts over the steps
    x = initial_noise(...)           text-to-image: the starting noise; image-to-image: noised_image(...), the init
                                     image's latents noised to the level where sampling starts; inpainting:
                                     inpainting.start(...), the same and the mask's condition
    x = denoise(...)                 the sampler's loop; each step's guided noise prediction is guidance(...)
                                     (inpainting: of the conditioned UNet, and the kept region restored after it)
    images = decode(models, x)       the VAE decoder

Seeds reproduce diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline
run with
`generator=torch.Generator("cpu").manual_seed(seed)`: the same random numbers are drawn in the same order (the VAE
posterior sample and the starting noise for image-to-image, the initial latents for text-to-image, then each
stochastic sampler step's noise), always in float32 on the CPU, so a seed gives the same image on any device.
"""

import contextlib
import math
import numbers
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from sd import inpainting
from sd.autoencoder import sample_posterior
from sd.deepcache import DeepCache
from sd.guidance import Guidance
from sd.images import check_size, default_size, image_to_tensor, open_image, pil_to_tensor, to_pil
from sd.lora import lora_tags, prompt_loras
from sd.model_loader import load_models
from sd.models import Models, check_device
from sd.prompts import EMPHASIS
from sd.samplers import make_sampler
from sd.sampling import CURRENT_STEP, TRAIN_STEPS, Sampler, noise, noise_like
from sd.tiling import tiled
from sd.tome import token_merging

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
    mask_blur: int | None = None  # inpainting only
    padding_mask_crop: int | None = None  # inpainting "only masked": the crop's padding
    masked_content: str | None = None  # inpainting, other than "original"
    deepcache: tuple[int, int] | None = None  # (interval, branch)
    tome: float = 0.0  # token merging ratio
    lora_hashes: dict[str, str] = field(default_factory=dict)  # the prompt's <lora:...> tags: name -> A1111's hash


@dataclass
class Generated:
    """What `generate` made: `images` (PIL images, a [B, 3, H, W] tensor in [0, 1], or the final [B, 4, h, w]
    latents) and the parameters that made them."""

    images: list[Image.Image] | torch.Tensor
    parameters: Parameters

    @property
    def seed(self) -> int:
        return self.parameters.seed


@dataclass
class Step:
    """What `generate(on_step=...)` is given after each sampler step, the batch's tensors on the compute device."""

    index: int  # steps taken before this one, from 0
    timestep: float
    latents: torch.Tensor  # [B, 4, h, w] after the step: what the next step starts from
    noise: torch.Tensor  # [B, 4, h, w] the guided noise prediction the step took
    denoised: torch.Tensor  # [B, 4, h, w] float32: the clean latents that prediction points at (x0-hat)


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
    emphasis: str = "original",
    pad_prompts: bool = False,
    lora_dir: str | Path | None = None,
    mask: str | Path | Image.Image | None = None,
    mask_blur: int = 0,
    paste_back: bool = False,
    padding_mask_crop: int | None = None,
    masked_content: str = "original",
    on_step: Callable[[Step], None] | None = None,
    deepcache: int | tuple[int, int] | None = None,
    tome: float = 0.0,
) -> Generated:
    """Images for a prompt (or a list of prompts, `batch_size` images each).

    sampler: ddpm, ddim, plms, euler, euler_a, lms, dpmpp_2m (or a Sampler); karras: their Karras sigma schedule;
    eta: DDIM's noise. cfg_scale: classifier-free guidance (1 or less: none, the negative prompt is unused).
    width, height: multiples of 8; default the model's size (512 for SD v1.x), or for image-to-image the init
    image's size rounded down to 8s (scaled down to about the model's size if it is larger).
    init_image: image-to-image from this image (a path or PIL image), noised as for `strength` of the steps (0
    keeps it, 1 starts from pure noise). latents: the initial noise, [B, 4, h, w], instead of drawing it.
    output_type: "pil", "tensor" ([B, 3, H, W] in [0, 1], on the CPU) or "latent" (final latents, undecoded).
    device: where to compute (default: where the UNet is); a network kept elsewhere (say on the CPU, to save GPU
    memory) is moved there for its turn only. vae_tile: encode and decode in overlapping tiles of this many pixels.
    Prompts follow A1111's syntax (sd/prompts.py); emphasis: how weights apply, "original" (A1111's default),
    "no_norm" or "none" (brackets are text); pad_prompts: a prompt and negative prompt of different lengths padded
    to one (A1111's pad_cond_uncond: one UNet call, other numbers) instead of taking a call each. lora_dir: where
    the prompt's `<lora:NAME:STRENGTH>` tags find NAME.safetensors; those LoRAs apply to this generation only.
    mask: inpainting (with init_image): repaint where the mask is white, keep where it is black (any mode, resized
    to the image); either kind of checkpoint (sd/inpainting.py). paste_back: the original pixels outside the mask in
    the output, its edge blurred over mask_blur pixels. padding_mask_crop: inpaint only the box around the mask
    (this many pixels wider, then widened to width x height's aspect), at width x height, and paste it back into
    the init image, which keeps its size (A1111's "only masked", diffusers' padding_mask_crop). masked_content:
    what the masked region starts from below strength 1, as A1111's option: "original" (diffusers'), "fill",
    "latent noise", "latent nothing".
    """
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    negatives = (
        list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
    )
    arguments = {name: value for name, value in locals().items() if name in ARGUMENT_TYPES}
    check_arguments(models, prompts, negatives, arguments)
    crop = None
    if padding_mask_crop is None:
        image, width, height = starting_image(init_image, width, height, models.image_size)
    else:
        crop = inpainting.OnlyMasked(init_image, mask, padding_mask_crop, width, height, models.image_size)
        image, mask, width, height = image_to_tensor(crop.image, crop.width, crop.height), crop.mask, *crop.size
    mask = None if mask is None else inpainting.open_mask(mask, width, height)
    sampler = make_sampler(sampler, karras=karras, eta=eta) if isinstance(sampler, str) else sampler
    seed = random.randrange(2**32) if seed is None else seed
    generator = torch.Generator("cpu").manual_seed(seed)
    device = models.device if device is None else torch.device(device)
    total = len(prompts) * batch_size
    start = 0 if image is None else first_step(steps, strength)
    sampler.set_steps(steps, start)

    untagged, tags = zip(*(lora_tags(prompt) for prompt in prompts))
    with prompt_loras(models, [tag for found in tags for tag in found], lora_dir) as lora_hashes:
        with placed(models.clip, device):
            guidance = Guidance.build(
                models, list(untagged), negatives, batch_size, steps, cfg_scale, clip_skip, emphasis, pad_prompts
            )
        inpaint = None
        if image is None:
            x = initial_noise(models, sampler, total, width, height, latents, generator, device)
        else:
            image, mask = image.to(device, models.dtype), None if mask is None else mask.to(device)
            with placed(models.encoder, device):
                if mask is None:
                    x = noised_image(models, sampler, image, total, start, generator, vae_tile)
                else:
                    x, start, inpaint = masked_start(
                        models, sampler, image, mask, total, start, strength, generator, vae_tile, masked_content
                    )
        if image is not None and start == steps and strength > 0 and (mask is None or mask.any()):
            message = f"strength {strength} of {steps} steps takes no step: the init image comes back unchanged"
            warnings.warn(message + " (raise the strength or the steps)", stacklevel=3)
        with placed(models.diffusion, device), token_merging(models.diffusion, tome):
            unet = models.diffusion if deepcache is None else DeepCache(models.diffusion, *deepcache_setting(deepcache))
            unet = unet if inpaint is None else inpaint.model(unet)
            keep = None if inpaint is None else inpaint.keep(sampler)
            x = denoise(unet, sampler, x, guidance, generator, start, progress, keep, on_step)
    check_finite(x, "the UNet")

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
        mask_blur=None if mask is None else mask_blur,
        padding_mask_crop=padding_mask_crop,
        masked_content=None if masked_content == "original" else masked_content,
        deepcache=None if deepcache is None else deepcache_setting(deepcache),
        tome=tome,
        lora_hashes=lora_hashes,
    )
    if output_type == "latent":
        return Generated(x, parameters)
    with placed(models.decoder, device):
        images = decode(models, x, vae_tile)
    check_finite(images, "the VAE decoder")
    images = (images / 2 + 0.5).clamp(0, 1).float()
    if paste_back:
        images = inpainting.paste_back(images, image, mask, mask_blur)
    images = images.cpu()
    if crop is not None:
        pasted = [crop.paste(picture) for picture in to_pil(images)]
        return Generated(pasted if output_type == "pil" else pil_to_tensor(pasted), parameters)
    return Generated(to_pil(images) if output_type == "pil" else images, parameters)


def check_arguments(models: Models, prompts, negatives, options: dict) -> None:
    """What generate() can refuse before any work: a TypeError or ValueError naming the argument."""
    for name, texts in (("prompt", prompts), ("negative_prompt", negatives)):
        if not all(isinstance(text, str) for text in texts):
            raise TypeError(f"{name} must be a string or a list of strings, got {texts!r:.80}")
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
    for name, kinds in ARGUMENT_TYPES.items():
        value = options[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.40}")
    for name in ("cfg_scale", "strength", "eta", "tome"):
        if not math.isfinite(options[name]):
            raise ValueError(f"{name} must be a finite number, got {options[name]}")
    steps, batch_size, strength = options["steps"], options["batch_size"], options["strength"]
    if not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"steps must be between 1 and {TRAIN_STEPS} (the steps SD v1 was trained with), got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    if options["seed"] is not None and not 0 <= options["seed"] < 2**64:
        raise ValueError(f"seed must be between 0 and 2**64 - 1 (or None for a random one), got {options['seed']}")
    if not 1 <= options["clip_skip"] <= models.clip.cfg.layers:
        raise ValueError(f"clip_skip must be between 1 and {models.clip.cfg.layers} for this model's CLIP")
    if options["emphasis"] not in EMPHASIS:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS)}, got {options['emphasis']!r}")
    if options["output_type"] not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {options['output_type']!r}")
    if options["device"] is not None:
        check_device(torch.device(options["device"]))
    if options["init_image"] is not None and options["latents"] is not None:
        raise ValueError("latents= gives text-to-image its starting noise; image-to-image starts from init_image")
    inpainting.check_options(options)
    if not 0 <= options["tome"] <= 0.75:
        raise ValueError(f"tome (the token merging ratio) must be between 0 and 0.75, got {options['tome']}")
    if options["deepcache"] is not None:
        DeepCache(models.diffusion, *deepcache_setting(options["deepcache"]))  # its own checks
    if models.diffusion.cfg.in_channels != models.encoder.cfg.latent_channels and options["mask"] is None:
        raise ValueError("an inpainting checkpoint needs an init image and a mask (init_image= and mask=)")


def deepcache_setting(setting: int | tuple[int, int]) -> tuple[int, int]:
    """generate's `deepcache` as (interval, branch)."""
    pair = (setting, 0) if isinstance(setting, numbers.Integral) else tuple(setting)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"deepcache must be an interval N or a pair (N, branch) of whole numbers, got {setting!r}")
    return int(pair[0]), int(pair[1])


Int, Real, NoneType = numbers.Integral, numbers.Real, type(None)  # numpy's numbers count too
ARGUMENT_TYPES = {
    "sampler": (str, Sampler),
    "steps": (Int,),
    "cfg_scale": (Real,),
    "seed": (Int, NoneType),
    "width": (Int, NoneType),
    "height": (Int, NoneType),
    "batch_size": (Int,),
    "init_image": (str, Path, Image.Image, NoneType),
    "strength": (Real,),
    "clip_skip": (Int,),
    "latents": (torch.Tensor, NoneType),
    "output_type": (str,),
    "progress": (bool,),
    "karras": (bool,),
    "eta": (Real,),
    "device": (str, torch.device, NoneType),
    "vae_tile": (Int, NoneType),
    "emphasis": (str,),
    "pad_prompts": (bool,),
    "lora_dir": (str, Path, NoneType),
    "mask": (str, Path, Image.Image, NoneType),
    "mask_blur": (Int,),
    "paste_back": (bool,),
    "padding_mask_crop": (Int, NoneType),
    "masked_content": (str,),
    "on_step": (Callable, NoneType),
    "deepcache": (Int, tuple, NoneType),
    "tome": (Real,),
}
TYPE_NAMES = {Int: "int", Real: "a number", NoneType: "None", Callable: "a function"}


def starting_image(
    init_image, width: int | None, height: int | None, native: int
) -> tuple[torch.Tensor | None, int, int]:
    """(the init image as [1, 3, H, W] in [-1, 1], or None; the size to draw): width x height, by default the
    model's native size, or for image-to-image the image's own (see images.default_size)."""
    if init_image is None:
        width, height = native if width is None else width, native if height is None else height
        check_size(width, height)
        return None, width, height
    check_size(8 if width is None else width, 8 if height is None else height)  # before opening the image
    image = open_image(init_image)
    own_width, own_height = default_size(image, native)
    scaled = (own_width, own_height) != (image.width - image.width % 8, image.height - image.height % 8)
    if scaled and (width is None or height is None):
        print(
            f"note: the init image is {image.width}x{image.height}; drawing at {own_width}x{own_height}, about the "
            f"model's {native}x{native} (pass -W/-H for another size)"
        )
    width, height = own_width if width is None else width, own_height if height is None else height
    return image_to_tensor(image, width, height), width, height


def check_finite(x: torch.Tensor, what: str) -> None:
    """A ValueError instead of a black image when a network produced NaN or infinity."""
    if not torch.isfinite(x).all():
        raise ValueError(
            f"{what} produced NaN or infinite values: the checkpoint's weights may be corrupt (or, in float16, too "
            "large for it: try --dtype fp32 / dtype=torch.float32)"
        )


# -- the stages ---------------------------------------------------------------------------------------------------


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


def image_latents(models: Models, image: torch.Tensor, generator, vae_tile) -> torch.Tensor:
    """A sample of the image's latent posterior, at the UNet's scale."""
    mean, logvar = encode(models, image, vae_tile)
    return models.encoder.cfg.scaling_factor * sample_posterior(mean, logvar, noise_like(mean, generator))


def noised_image(
    models: Models, sampler: Sampler, image: torch.Tensor, total: int, start: int, generator, vae_tile
) -> torch.Tensor:
    """Image-to-image's start: a sample of the image's latent posterior, `total` times, noised to the level of
    step `start` (no noise when no step is left to take)."""
    x0 = image_latents(models, image, generator, vae_tile).repeat(total, 1, 1, 1)
    return sampler.add_noise(x0, noise_like(x0, generator), start) if start < len(sampler.timesteps) else x0


def masked_start(
    models: Models, sampler: Sampler, image, mask, total: int, start: int, strength: float, generator, vae_tile, content
) -> tuple[torch.Tensor, int, inpainting.Inpainting | None]:
    """Inpainting's start (sd/inpainting.py): the starting latents, the step sampling starts at, and what the
    sampling stage needs; an all-black mask leaves nothing to repaint, so the image's own latents and no step."""
    latents_of = lambda pixels: image_latents(models, pixels, generator, vae_tile)  # noqa: E731
    if not mask.any():
        message = "the mask is all black, nothing to repaint: the init image comes back as the VAE reproduces it"
        warnings.warn(message, stacklevel=4)
        return latents_of(image).repeat(total, 1, 1, 1), len(sampler.timesteps), None
    x, inpaint = inpainting.start(models, sampler, image, mask, total, start, strength, generator, latents_of, content)
    return x, start, inpaint


def denoise(
    unet,
    sampler: Sampler,
    x: torch.Tensor,
    guidance: Guidance,
    generator: torch.Generator,
    start: int = 0,
    progress: bool = True,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> torch.Tensor:
    """The sampling loop from step `start` on: the guided noise prediction, then the sampler's step. `unet` is
    whatever predicts the noise, called as the UNet is, (latents, timestep, context): where per-step features
    (hooks, caches, inpainting's condition) attach; `after_step(x, i)` may change each step's result (inpainting
    restores the kept region); `on_step` sees each step's outcome. Prompt edits count the steps taken, from 0, as
    A1111 does; so do CURRENT_STEP and `Step.index`."""
    for i in tqdm(range(start, len(sampler.timesteps)), desc=sampler.label, disable=not progress):
        t = sampler.timesteps[i]
        token = CURRENT_STEP.set((i - start, float(t)))
        try:
            eps = guidance(unet, sampler.scale_input(x, i), t, i - start)
        finally:
            CURRENT_STEP.reset(token)
        denoised = None if on_step is None else sampler.denoised(eps, i, x)  # before the step: a multistep
        x = sampler.step(eps, i, x, generator)  # sampler's state moves on with it
        if after_step is not None:
            x = after_step(x, i)
        if on_step is not None:
            on_step(Step(i - start, float(t), x, eps, denoised))
    return x


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

    def inpaint(self, prompt: str | list[str], image, mask, strength: float = 1.0, **kwargs) -> list[Image.Image]:
        """The prompt drawn where `mask` is white in `image` (paths or PIL images); strength 1 (diffusers' default)
        repaints from pure noise. kwargs: those of `generate` (paste_back, mask_blur, ...)."""
        if image is None or mask is None:
            raise ValueError("inpaint needs an image and a mask (paths or PIL images)")
        return generate(prompt, self.models, init_image=image, mask=mask, strength=strength, **kwargs).images

    def img2img(self, prompt: str | list[str], image, strength: float = 0.75, **kwargs) -> list[Image.Image]:
        """The prompt drawn into `image` (a path or PIL image); strength: how much of it to redraw, 0..1."""
        if image is None:
            raise ValueError("img2img needs an image (a path or a PIL image); txt2img draws from the prompt alone")
        return generate(prompt, self.models, init_image=image, strength=strength, **kwargs).images
