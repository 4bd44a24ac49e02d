"""Images in and out of the pipeline: files and PIL images to [-1, 1] tensors of a size the VAE takes, and back."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


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
