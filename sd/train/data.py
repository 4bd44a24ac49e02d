"""Training data: the synthetic shapes (drawn afresh for every batch), a folder of captioned images, and a pool of
pre-encoded latents to draw diffusion batches from. Every source's `batch(rng, n, share)` draws a batch of n and
returns the `share` of it (a slice: one process's part under torchrun) as (images or moments, captions, sources or
None): the random choices are made for all n, so every process's generator stays in step, and only the share is
drawn or read."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sd.shapes import SHAPES, UNSEEN_SHAPES, caption, inpainting_sample, random_scene, recoloured, render

EVERYTHING = slice(None)


class ShapesData:
    """The synthetic shapes, drawn afresh for every batch (see sd/shapes.py). recolour: the fraction of samples whose
    source is the same scene with the shape in another colour (the edit the model then learns; see Trainer.edited).
    shapes: the shapes drawn (the built-in model's five, or shapes it never saw, for a LoRA)."""

    image_size = 64

    def __init__(self, recolour: float = 0.0, shapes: tuple[str, ...] = SHAPES):
        if not 0 <= recolour <= 1:
            raise ValueError(f"recolour is a fraction of samples, in [0, 1]; got {recolour}")
        unknown = set(shapes) - set(SHAPES + UNSEEN_SHAPES)
        if unknown or not shapes:
            raise ValueError(f"shapes are some of {', '.join(SHAPES + UNSEEN_SHAPES)}; got {', '.join(shapes)}")
        self.recolour, self.shapes = recolour, tuple(shapes)

    def batch(
        self, rng: np.random.Generator, n: int, share: slice = EVERYTHING
    ) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """(images [n, 3, 64, 64] in [-1, 1], captions, sources: images to noise instead, or None: the images)."""
        scenes = [random_scene(rng, self.shapes) for _ in range(n)]
        captions = [caption(scene, rng) for scene in scenes]
        images = self.draw(scenes[share])
        if not self.recolour:
            return images, captions[share], None
        changes = [recoloured(scene, rng) if rng.random() < self.recolour else None for scene in scenes]
        changed = {i: scene for i, scene in enumerate(changes[share]) if scene is not None}
        sources = images.clone()
        if changed:
            sources[list(changed)] = self.draw(list(changed.values()))
        return images, captions[share], sources

    @staticmethod
    def draw(scenes) -> torch.Tensor:
        return to_tensor(np.stack([np.asarray(render(scene)) for scene in scenes]))


class InpaintingShapes:
    """The shapes world for training an inpainting model (sd.shapes.inpainting_sample): `batch` returns (images,
    captions, masks [n, 1, 64, 64], 1: repaint); a caption says what is under the mask (the second shape where
    there are two)."""

    image_size = 64

    def batch(
        self, rng: np.random.Generator, n: int, share: slice = EVERYTHING
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        samples = [inpainting_sample(rng) for _ in range(n)]
        captions = [caption(second or first, rng) for first, second, _ in samples]
        chosen = samples[share]
        images = to_tensor(np.stack([np.asarray(render(a, *([b] if b else []))) for a, b, _ in chosen]))
        masks = torch.from_numpy(np.stack([mask for _, _, mask in chosen])[:, None]).float()
        return images, captions[share], masks


class LatentPool:
    """Diffusion batches drawn from `size` samples that the frozen autoencoder encoded once: each draw takes a fresh
    latent from a sample's posterior, with fresh noise, timestep and caption dropout (a sample keeps the caption it was
    drawn with), so the autoencoder runs once per sample instead of once per draw."""

    def __init__(self, data, encoded, size: int, rng: np.random.Generator, chunk: int = 64):
        """encoded: (images, captions, sources) -> (moments, captions, source moments or None), as
        Trainer.diffusion_batch."""
        parts = []
        with tqdm(total=size, desc="latent pool", dynamic_ncols=True) as bar:
            for start in range(0, size, chunk):
                parts.append(encoded(*data.batch(rng, min(chunk, size - start))))
                bar.update(len(parts[-1][1]))
        self.moments = torch.cat([moments for moments, _, _ in parts])
        self.captions = [c for _, captions, _ in parts for c in captions]
        self.sources = None if parts[0][2] is None else torch.cat([sources for _, _, sources in parts])

    def batch(
        self, rng: np.random.Generator, n: int, share: slice = EVERYTHING
    ) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        picks = rng.integers(len(self.captions), size=n)[share]
        sources = None if self.sources is None else self.sources[picks]
        return self.moments[picks], [self.captions[i] for i in picks], sources


class FolderData:
    """Images with a caption file beside each (`x.png` + `x.txt`), resized and centre-cropped to a square."""

    def __init__(self, folder: Path, image_size: int):
        self.image_size = image_size
        self.items = [
            (p, p.with_suffix(".txt"))
            for p in sorted(folder.iterdir())
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.with_suffix(".txt").is_file()
        ]
        if not self.items:
            raise ValueError(f"{folder}: no images with captions (expected pairs such as cat.png + cat.txt)")

    def batch(
        self, rng: np.random.Generator, n: int, share: slice = EVERYTHING
    ) -> tuple[torch.Tensor, list[str], None]:
        picks = [self.items[i] for i in rng.integers(len(self.items), size=n)[share]]
        images = np.stack([np.asarray(self.square(Image.open(p).convert("RGB"))) for p, _ in picks])
        return to_tensor(images), [t.read_text().strip() for _, t in picks], None

    def square(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((self.image_size,) * 2, Image.LANCZOS)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] in [-1, 1], contiguous: a channels-last batch would run every layer
    channels-last, where bf16 GroupNorm's backward is many times slower on CPU (docs/training.md)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1
