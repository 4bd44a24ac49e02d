"""Inpainting: repaint what a mask marks (white), keep the rest (black), with either kind of SD v1 checkpoint.

- A 9-channel UNet (v1.5 inpainting) sees the condition at every call: its input is [noisy latents, the mask at
  latent size, the latents of the masked image (the image with the repainted region set to 0, mid-grey)].
- A 4-channel UNet (every ordinary model) is held to the image outside the mask: after each sampler step that region
  is replaced by the image's latents noised to the next step's level (with the starting noise), after the last step
  by the clean latents.

Both follow diffusers' StableDiffusionInpaintPipeline number for number, random numbers included: the image's
posterior sample (4 channels, or strength < 1), the starting noise, the masked image's posterior sample (drawn for
4 channels too, where diffusers encodes the masked image and leaves it unused: later draws, such as Euler a's, stay
the same). `paste_back` (off by default: the diffusers-exact path) then puts the original pixels back outside the
mask, its edge softened over `mask_blur` pixels, so the VAE's round trip leaves what was not repainted untouched.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from sd.images import check_size, default_size, open_image
from sd.models import Models
from sd.sampling import Sampler, noise, noise_like


def check_options(options: dict) -> None:
    """generate()'s inpainting arguments, checked before any work: a ValueError naming the one that is wrong."""
    mask = options["mask"]
    if mask is not None and options["init_image"] is None:
        raise ValueError("a mask marks what to repaint in an init image: pass init_image= too")
    if options["mask_blur"] < 0:
        raise ValueError(f"mask_blur is a number of pixels, 0 or more; got {options['mask_blur']}")
    if (options["mask_blur"] or options["paste_back"]) and mask is None:
        raise ValueError("mask_blur and paste_back apply to inpainting: pass mask= (and init_image=) too")
    padding = options["padding_mask_crop"]
    if padding is not None and mask is None:
        raise ValueError("padding_mask_crop inpaints the box around a mask: pass mask= (and init_image=) too")
    if padding is not None and padding < 0:
        raise ValueError(f"padding_mask_crop is a number of pixels, 0 or more; got {padding}")
    content = options["masked_content"]
    if content not in MASKED_CONTENT:
        raise ValueError(f"masked_content must be one of {', '.join(MASKED_CONTENT)}, got {content!r}")
    if content != "original" and mask is None:
        raise ValueError("masked_content applies to inpainting: pass mask= (and init_image=) too")
    if options["mask_blur"] and not options["paste_back"]:
        raise ValueError("mask_blur softens the edge where paste_back puts the original pixels back: add paste_back")


def open_mask(mask: str | Path | Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 1, height, width], 1 where to repaint: the mask's grey levels (any mode), resized to the image (Lanczos)
    and cut at one half, as diffusers' mask processor does."""
    image = open_image(mask, "mask").convert("L")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    grey = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None, None]
    return (grey >= 0.5).float()


@dataclass
class Inpainting:
    """What the sampling stages need to inpaint (made by `start`)."""

    latent_mask: torch.Tensor  # [1, 1, h, w]: 1 where to repaint
    first_noise: torch.Tensor  # [B, 4, h, w]: the starting noise
    clean: torch.Tensor | None  # [B, 4, h, w]: the image's latents (4-channel UNets)
    masked: torch.Tensor | None  # [1, 4, h, w]: the masked image's latents (9-channel UNets)

    def model(self, unet: Callable) -> Callable:
        """The noise predictor the sampler calls: a 9-channel UNet gets the mask and the masked image's latents
        after the (scaled) noisy latents, for every row of the batch."""
        if self.masked is None:
            return unet
        condition = torch.cat([self.latent_mask, self.masked], dim=1)  # [1, 5, h, w]

        def conditioned(x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
            extra = condition.to(x).expand(len(x), -1, -1, -1)
            return unet(torch.cat([x, extra], dim=1), t, context)

        return conditioned

    def keep(self, sampler: Sampler) -> Callable | None:
        """For a 4-channel UNet, what follows each step i: outside the mask, the image's latents at the noise level
        of step i + 1 (the clean latents after the last step)."""
        if self.clean is None:
            return None
        last = len(sampler.timesteps) - 1

        def kept(x: torch.Tensor, i: int) -> torch.Tensor:
            known = self.clean if i == last else sampler.add_noise(self.clean, self.first_noise, i + 1)
            m = self.latent_mask.to(x)
            return (1 - m) * known + m * x

        return kept


def start(
    models: Models,
    sampler: Sampler,
    image: torch.Tensor,
    mask: torch.Tensor,
    total: int,
    first: int,
    strength: float,
    generator: torch.Generator,
    latents_of: Callable[[torch.Tensor], torch.Tensor],
    content: str = "original",
) -> tuple[torch.Tensor, Inpainting]:
    """The starting latents (pure noise at strength 1, else the image's latents noised to the level of step
    `first`) and the run's Inpainting. image: [1, 3, H, W] in [-1, 1]; mask: [1, 1, H, W]; latents_of: an image's
    posterior sample at the UNet's scale (it draws from `generator`). content: what the masked region starts from
    below strength 1 (A1111's "masked content"): "original" (diffusers'), "fill" (the surroundings' colours, before
    encoding), "latent noise" (standard normal latents, drawn last), "latent nothing" (zero latents)."""
    nine = models.diffusion.cfg.in_channels > models.encoder.cfg.latent_channels
    source = fill(image, mask) if content == "fill" else image
    clean = latents_of(source).repeat(total, 1, 1, 1) if not nine or strength < 1 else None
    factor = models.encoder.cfg.pixels_per_latent
    shape = (total, models.encoder.cfg.latent_channels, image.shape[2] // factor, image.shape[3] // factor)
    first_noise = noise(shape, generator, image.device, models.dtype)
    masked_image = image * (mask < 0.5).to(image)
    if nine:
        masked = latents_of(masked_image)
    else:  # see the module's docstring
        masked = None
        noise((1, *shape[1:]), generator, image.device, models.dtype)
    latent_mask = F.interpolate(mask, size=shape[2:]).to(image)  # nearest, as diffusers
    if strength == 1:
        x = first_noise * sampler.init_noise_sigma
    else:
        begin = clean
        if content in ("latent noise", "latent nothing"):
            inside = noise_like(clean, generator) if content == "latent noise" else torch.zeros_like(clean)
            begin = (1 - latent_mask) * clean + latent_mask * inside
        x = sampler.add_noise(begin, first_noise, first) if first < len(sampler.timesteps) else begin
    return x, Inpainting(latent_mask, first_noise, None if nine else clean, masked)


MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")


def fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with its masked region painted in the colours around it: averages of the unmasked pixels over
    windows from coarse to fine (a window with no unmasked pixel keeps the coarser estimate)."""
    known = (mask < 0.5).to(image)
    estimate = (image * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    estimate = estimate.expand_as(image)
    for radius in (32, 8, 2):
        window = dict(kernel_size=2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
        share = F.avg_pool2d(known, **window)
        local = F.avg_pool2d(image * known, **window) / share.clamp(min=1e-6)
        estimate = torch.where(share > 0, local, estimate)
    return known * image + (1 - known) * estimate


def paste_back(images: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, blur: int) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] with the original image ([1, 3, H, W] in [-1, 1]) outside the mask, whose edge
    is blurred over `blur` pixels (Gaussian, as A1111's "Mask blur")."""
    weight = mask
    if blur:
        grey = Image.fromarray((mask[0, 0].cpu().numpy() * 255).astype(np.uint8))
        grey = grey.filter(ImageFilter.GaussianBlur(blur))
        weight = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255)[None, None]
    weight = weight.to(images)
    original = (image.to(images) / 2 + 0.5).clamp(0, 1)
    return (1 - weight) * original + weight * images


# -- "only masked" (A1111's "Inpaint area: Only masked", diffusers' padding_mask_crop) ------------------------------


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): the box around the mask's non-black pixels, `pad` pixels wider on every side
    (within the image), then widened or heightened about its centre, kept inside the image where it can be, to the
    aspect ratio of width x height (diffusers' get_crop_region, pixel for pixel)."""
    marked = np.asarray(mask.convert("L")) > 0
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    h, w = marked.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = widened(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = widened(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def widened(low: int, high: int, more: int, size: int) -> tuple[int, int]:
    """[low, high) grown by `more` (half on each side), shifted back inside [0, size), cut at size."""
    low, high = low - more // 2, high + more - more // 2
    if high >= size:
        low, high = low - (high - size), size
    if low < 0:
        low, high = 0, high - low
    return low, min(high, size)


def centred(image: Image.Image, width: int, height: int, cover: bool) -> tuple[Image.Image, Image.Image, int, int]:
    """The image scaled (Lanczos, aspect kept) to fit inside width x height, or with `cover` to cover it, pasted
    centred on a black width x height canvas: (canvas, scaled image, its left, its top), as diffusers' resize modes
    "fill" and "crop" compute them."""
    ratio, own = width / height, image.width / image.height
    by_width = own < ratio if cover else own > ratio
    w = width if by_width else image.width * height // image.height
    h = image.height * width // image.width if by_width else height
    resized = image.resize((w, h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    left, top = width // 2 - w // 2, height // 2 - h // 2
    out.paste(resized, (left, top))
    return out, resized, left, top


def fill_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled to fit width x height, centred, and the bands left over filled by stretching its edge rows
    or columns (diffusers' resize_mode "fill")."""
    out, resized, left, top = centred(image, width, height, cover=False)
    w, h = resized.size
    ratio, own = width / height, image.width / image.height
    if own > ratio and top > 0:  # bands above and below
        out.paste(resized.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        out.paste(resized.resize((width, top), box=(0, h, width, h)), (0, top + h))
    elif own < ratio and left > 0:  # bands left and right
        out.paste(resized.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(resized.resize((left, height), box=(w, 0, w, height)), (left + w, 0))
    return out


def crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled to cover width x height, centred, the overflow cut off (diffusers' resize_mode "crop")."""
    return centred(image, width, height, cover=True)[0]


def overlay(mask: Image.Image, original: Image.Image, generated: Image.Image, box) -> Image.Image:
    """The generated crop put back at `box` in the original's frame, under the original's pixels where the mask is
    black (diffusers' apply_overlay)."""
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    frame = Image.new("RGBA", original.size)
    frame.paste(crop_resize(generated, x2 - x1, y2 - y1), (x1, y1))
    frame.alpha_composite(kept.convert("RGBA"))
    return frame.convert("RGB")


class OnlyMasked:
    """Inpainting only the box around the mask: `image` and `mask` are the crops the pipeline runs on, at `size`
    (width x height, by default the init image's own size, as for image-to-image); `paste` puts an output back into
    the init image, which keeps its size. A mask of another size than the image is first resized to it."""

    def __init__(self, init_image, mask, pad: int, width: int | None, height: int | None, native: int):
        self.original = open_image(init_image)
        own_width, own_height = default_size(self.original, native)
        self.size = self.width, self.height = width or own_width, height or own_height
        check_size(*self.size)
        width, height = self.size
        self.mask_image = open_image(mask, "mask").convert("L")
        if self.mask_image.size != self.original.size:
            self.mask_image = self.mask_image.resize(self.original.size, Image.LANCZOS)
        marked = np.asarray(self.mask_image).any()
        self.box = crop_region(self.mask_image, width, height, pad) if marked else (0, 0, *self.original.size)
        self.image = fill_resize(self.original.crop(self.box), width, height)
        self.mask = fill_resize(self.mask_image.crop(self.box), width, height)

    def paste(self, generated: Image.Image) -> Image.Image:
        return overlay(self.mask_image, self.original, generated, self.box)


def outpainting(image: Image.Image, left: int, top: int, right: int, bottom: int) -> tuple[Image.Image, Image.Image]:
    """(the image on a canvas larger by these many pixels on each side, the mask that repaints the new border):
    outpainting as inpainting. The border starts as the image's edge pixels stretched outwards, so that image-to-image
    strengths below 1 start from the neighbouring colours."""
    if min(left, top, right, bottom) < 0 or not any((left, top, right, bottom)):
        raise ValueError(
            f"outpainting extends the canvas by pixels 0 or more, some more than 0; got {left, top, right, bottom}"
        )
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(pixels.shape[:2], 255, dtype=np.uint8)
    mask[top : top + image.height, left : left + image.width] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)
