"""Images in and out of the pipeline: files and PIL images to [-1, 1] tensors of a size the VAE takes, and back."""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            hint = f" (try {lower} or {upper})" if lower > 0 else " (try 8 or more)"
            raise ValueError(f"{name} must be a positive multiple of 8, got {value}{hint}")


def open_image(image: str | Path | Image.Image, what: str = "init image") -> Image.Image:
    """An RGB image from a path or a PIL image, upright as viewers show it (EXIF orientation applied) and 16-bit
    greyscale scaled to 8 bits; a missing, unreadable or oversized file is a one-line ValueError naming it as
    `what`."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    path = Path(image)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a directory; pass an image file")
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as opened:
            return to_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{what} {path}: refused, too many pixels to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{what} {path}: not a readable image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own conversion clips 16- and 32-bit greyscale at 255 (a white image); they are scaled."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        levels = np.asarray(image, dtype=np.float64) * (255 / 65535)
        image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def default_size(image: Image.Image, native: int) -> tuple[int, int]:
    """Image-to-image's size when none is given: the image's own, rounded down to multiples of 8; an image of more
    pixels than native x native is scaled down to about that many (its aspect kept), as other SD front ends draw
    at the model's size, and a photo's size would not fit in memory."""
    scale = min(1.0, native / (image.width * image.height) ** 0.5)
    width, height = int(image.width * scale), int(image.height * scale)
    return width - width % 8, height - height % 8


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL image -> [1, 3, height, width] in [-1, 1], resized (Lanczos, as diffusers) if it is another size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"init image is {image.width}x{image.height}; it needs at least 8x8 pixels")
    if (width, height) != image.size:
        print(f"init image resized from {image.width}x{image.height} to {width}x{height}")
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images, rounding to 8 bits as diffusers does."""
    array = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2) / 255


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """The images in rows of `columns` (default: as square a sheet as they make), left to right."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet
