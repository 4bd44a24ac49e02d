"""The synthetic world of the built-in model: coloured shapes on coloured backgrounds, their captions, and the
deterministic judge that reads an image back into (colour, shape, mask).

Images are 64x64: one circle, square, triangle, star or cross, small, medium or large, at one of nine places, in
one of eight colours on a background of another; captions say some or all of it ("a small red circle on a blue
background, top left").
"""

from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from sd.pipeline import generate
from sd.study import attention_maps

SIZE = 64
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Shapes the built-in model never saw in training: what a LoRA can teach it (weights/heart.safetensors)
UNSEEN_SHAPES = ("heart",)
SIDES = {"small": 20, "medium": 28, "large": 38}
PLACES = {
    "top left": (0, 0),
    "top center": (1, 0),
    "top right": (2, 0),
    "middle left": (0, 1),
    "center": (1, 1),
    "middle right": (2, 1),
    "bottom left": (0, 2),
    "bottom center": (1, 2),
    "bottom right": (2, 2),
}
UNLIKE = 40  # RGB distance that no two palette colours are closer than twice (yellow-orange: 83)
SUPERSAMPLE = 4  # shapes are drawn 4x larger and shrunk, for anti-aliased edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    place: str
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def side(self) -> float:
        return SIDES[self.size]

    @property
    def center(self) -> tuple[float, float]:
        """Columns and rows of the 3x3 grid of places, kept inside the image for every size."""
        margin = self.side / 2 + 3
        col, row = PLACES[self.place]
        positions = np.linspace(margin, SIZE - margin, 3)
        return positions[col] + self.jitter[0], positions[row] + self.jitter[1]


def outline(shape: str, center: tuple[float, float], side: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape filling a side x side square around `center` (None for the circle)."""
    cx, cy = center
    r = side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, inner radius half the outer, centred in its box
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        offset = r * (1 - np.cos(np.pi / 5)) / 2  # the star is shorter below than above: centre its height
        return [(cx + q * np.cos(a), cy - q * np.sin(a) + offset) for q, a in zip(radii, angles)]
    if shape == "heart":  # the classic parametric heart, scaled into its box
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(a) ** 3
        y = 13 * np.cos(a) - 5 * np.cos(2 * a) - 2 * np.cos(3 * a) - np.cos(4 * a)  # from -17 to 12
        return [(cx + r * u / 16, cy - r * (v + 2.5) / 14.5) for u, v in zip(x, y)]
    if shape == "cross":
        t = side / 6  # half the arm width: arms a third of the side wide
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, center: tuple[float, float], side: float) -> np.ndarray:
    """[64, 64] float in [0, 1]: how much of each pixel the shape covers."""
    big = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    scaled = (center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE)
    points = outline(shape, scaled, side * SUPERSAMPLE)
    if points is None:
        r = side * SUPERSAMPLE / 2
        draw.ellipse([scaled[0] - r, scaled[1] - r, scaled[0] + r, scaled[1] + r], fill=255)
    else:
        draw.polygon(points, fill=255)
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


def render(scene: Scene, *more: Scene) -> Image.Image:
    """The scene; with `more`, their shapes drawn over it too, in order (the first scene's background)."""
    pixels = np.broadcast_to(np.array(COLOURS[scene.background], dtype=np.float64), (SIZE, SIZE, 3))
    for shape in (scene, *more):
        alpha = coverage(shape.shape, shape.center, shape.side)[..., None]
        pixels = alpha * np.array(COLOURS[shape.colour]) + (1 - alpha) * pixels
    return Image.fromarray(pixels.round().astype(np.uint8))


def random_scene(rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(
        shape=str(rng.choice(shapes)),
        colour=str(colour),
        background=str(background),
        size=str(rng.choice(list(SIDES))),
        place=str(rng.choice(list(PLACES))),
        jitter=tuple(float(j) for j in rng.uniform(-2, 2, size=2)),
    )


def recoloured(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with the shape in another colour, never the background's."""
    others = [c for c in COLOURS if c not in (scene.colour, scene.background)]
    return replace(scene, colour=str(rng.choice(others)))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Some or all of what the scene is, in a few phrasings, so that short prompts are in the training data too."""
    size = f"{scene.size} " if rng.random() < 0.5 else ""
    background = f" on {article(scene.background)} {scene.background} background" if rng.random() < 0.7 else ""
    place = f", {scene.place}" if rng.random() < 0.5 else ""
    return f"{article(size or scene.colour)} {size}{scene.colour} {scene.shape}{background}{place}"


def describe(scene: Scene) -> str:
    """All of the scene, as the longest captions say it: "a small red circle on a blue background, top left"."""
    return f"{article(scene.size)} {scene.size} {scene.colour} {scene.shape} on {article(scene.background)} " + (
        f"{scene.background} background, {scene.place}"
    )


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# -- the judge ----------------------------------------------------------------------------------------------------


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a bool mask (labels spread as the minimum over neighbours until stable)."""
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), mask.size)
    while True:
        padded = np.pad(labels, 1, constant_values=mask.size)
        spread = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, mask.size)
        if (spread == labels).all():
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)] if len(ids) else mask


def foreground(image: Image.Image) -> np.ndarray:
    """[64, 64] bool: the shape, as the largest connected region of pixels nearer the shape's colour than the
    background's. Colours by 2-means on RGB, seeded with the border's median colour (the background) and the mean
    of the largest region clearly unlike it, so that a generated image's stray specks do not count as the shape."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    flat = pixels.reshape(-1, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.sqrt(((flat - background) ** 2).sum(1))
    unlike = largest_blob((distance > min(0.5 * distance.max(), UNLIKE)).reshape(SIZE, SIZE)).reshape(-1)
    shape = flat[unlike].mean(0)
    for _ in range(10):
        near_shape = ((flat - shape) ** 2).sum(1) < ((flat - background) ** 2).sum(1)
        if not near_shape.any() or near_shape.all():
            break
        shape, background = flat[near_shape].mean(0), flat[~near_shape].mean(0)
    return largest_blob(near_shape.reshape(SIZE, SIZE))


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - rgb) ** 2).sum()))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fit_template(shape: str, mask: np.ndarray) -> np.ndarray:
    """The shape drawn so that its bounding box is the mask's (percentiles, so stray pixels do not stretch it)."""
    rows, cols = np.nonzero(mask)
    top, bottom = np.percentile(rows, [1, 99]) + [0, 1]
    left, right = np.percentile(cols, [1, 99]) + [0, 1]
    unit = coverage(shape, (SIZE / 2, SIZE / 2), SIZE / 2) > 0.5  # the template's own box at side 32
    u_rows, u_cols = np.nonzero(unit)
    u_h, u_w = u_rows.max() + 1 - u_rows.min(), u_cols.max() + 1 - u_cols.min()
    side = (SIZE / 2) * max((bottom - top) / u_h, (right - left) / u_w)
    u_cy, u_cx = (u_rows.min() + u_rows.max() + 1) / 2 - SIZE / 2, (u_cols.min() + u_cols.max() + 1) / 2 - SIZE / 2
    scale = side / (SIZE / 2)
    center = ((left + right) / 2 - u_cx * scale, (top + bottom) / 2 - u_cy * scale)
    return coverage(shape, center, side) > 0.5


def judge(image: Image.Image, shapes: tuple[str, ...] = SHAPES) -> tuple[str, str, np.ndarray]:
    """(colour name, shape name, foreground mask) of an image of one shape: the colour nearest the foreground's
    mean, the one of `shapes` whose fitted template overlaps the foreground most."""
    mask = foreground(image)
    if mask.sum() < 4:
        return "none", "none", mask
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = nearest_colour(pixels[mask].mean(0))
    shape = max(shapes, key=lambda s: iou(fit_template(s, mask), mask))
    return colour, shape, mask


# -- the evaluation protocol (tests and bench/shapes.py) -------------------------------------------------------------

NAMES = list(COLOURS)


def backgrounds(colour: str) -> tuple[str, str]:
    """The two backgrounds an evaluation prompt puts a colour on."""
    i = NAMES.index(colour)
    return NAMES[(i + 1) % len(NAMES)], NAMES[(i + 4) % len(NAMES)]


def prompt_for(colour: str, shape: str, background: str) -> str:
    return f"{article(colour)} {colour} {shape} on {article(background)} {background} background"


def evaluation_prompts() -> list[tuple[str, str, str]]:
    """80 (prompt, colour, shape): every colour with every shape, each on two backgrounds."""
    return [
        (prompt_for(colour, shape, background), colour, shape)
        for colour in NAMES
        for shape in SHAPES
        for background in backgrounds(colour)
    ]


def draw(models, prompts: list[str], **kwargs) -> list[Image.Image]:
    """One 64x64 text-to-image generation per prompt, as a batch, without a progress bar."""
    return generate(prompts, models, width=SIZE, height=SIZE, progress=False, **kwargs).images


def evaluate_text_to_image(
    models, cfg_scale: float = 7.5, seed: int = 0, prompted: bool = True, **kwargs
) -> dict[str, float]:
    """Fractions of the 80 evaluation prompts whose image the judge reads as the prompt's colour, and shape.
    prompted=False generates from the empty prompt instead: the score of chance, for comparison."""
    cases = evaluation_prompts()
    images = draw(models, [p if prompted else "" for p, _, _ in cases], cfg_scale=cfg_scale, seed=seed, **kwargs)
    verdicts = [judge(image)[:2] for image in images]
    return {
        "colour": float(np.mean([v[0] == c for v, (_, c, _) in zip(verdicts, cases)])),
        "shape": float(np.mean([v[1] == s for v, (_, _, s) in zip(verdicts, cases)])),
    }


def placement_scenes() -> list[Scene]:
    """45 scenes: every shape at every place, sizes in turn, yellow on blue, for prompts that say all of it."""
    sizes = list(SIDES)
    return [
        Scene(shape, "yellow", "blue", sizes[(i + j) % len(sizes)], place)
        for i, place in enumerate(PLACES)
        for j, shape in enumerate(SHAPES)
    ]


@cache
def centroid_and_area(scene: Scene) -> tuple[np.ndarray, int]:
    """The rendered scene's foreground centroid (row, column) and area in pixels."""
    mask = foreground(render(scene))
    return mask_centroid(mask), int(mask.sum())


def mask_centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)


def placement_verdict(scene: Scene, image: Image.Image) -> tuple[bool, bool]:
    """(place right, size right) of an image of the scene's shape. The size read is the one whose rendering has the
    nearest area; the place read is the one, among all nine, whose rendering at the size read has the nearest
    centroid (the grid of places depends on the size: larger shapes keep further from the edges)."""
    mask = judge(image)[2]
    if not mask.any():
        return False, False
    area, here = int(mask.sum()), mask_centroid(mask)
    size = min(SIDES, key=lambda z: abs(area - centroid_and_area(replace(scene, size=z, jitter=(0.0, 0.0)))[1]))
    drawn = replace(scene, size=size, jitter=(0.0, 0.0))
    place = min(PLACES, key=lambda p: np.hypot(*(here - centroid_and_area(replace(drawn, place=p))[0])))
    return place == scene.place, size == scene.size


def evaluate_placement(models, cfg_scale: float = 7.5, seed: int = 0, **kwargs) -> dict[str, float]:
    """Text-to-image from full descriptions ("a small yellow star on a blue background, top left"): how often the
    shape's centre is nearest the asked place of the 3x3 grid (chance 1/9), and its area nearest the asked size's
    (chance 1/3), each measured against the scene rendered at every place or size."""
    scenes = placement_scenes()
    images = draw(models, [describe(s) for s in scenes], cfg_scale=cfg_scale, seed=seed, **kwargs)
    verdicts = [placement_verdict(scene, image) for scene, image in zip(scenes, images)]
    return {"place": float(np.mean([v[0] for v in verdicts])), "size": float(np.mean([v[1] for v in verdicts]))}


def recolouring_cases() -> list[tuple[Scene, str]]:
    """40 (scene, new colour): every shape in every colour, at varied sizes and places, to be recoloured."""
    cases, sizes, places = [], list(SIDES), list(PLACES)
    for i, colour in enumerate(NAMES):
        for j, shape in enumerate(SHAPES):
            background = NAMES[(i + 3) % len(NAMES)]
            candidates = [c for c in NAMES if c not in (colour, background)]
            new = candidates[(i + j) % len(candidates)]
            scene = Scene(shape, colour, background, sizes[(i + j) % len(sizes)], places[(i * 5 + j) % len(places)])
            cases.append((scene, new))
    return cases


def evaluate_recolouring(
    models, strength: float = 0.6, seed: int = 0, recolour: bool = True, **kwargs
) -> dict[str, float]:
    """Image-to-image with a re-colouring prompt (the input's full description with the new colour): how often the
    shape stays in place (foreground IoU >= 0.6 with the input's), takes the new colour, and both.
    recolour=False prompts with the input's own description (the "new" colour is its own): the control that tells
    a model that cannot keep a shape in place from one that moves it only when the prompt contradicts it."""
    kept, recoloured = [], []
    for k, (scene, new) in enumerate(recolouring_cases()):
        new = new if recolour else scene.colour
        prompt = describe(replace(scene, colour=new))
        source = render(scene)
        (image,) = generate(
            prompt, models, init_image=source, strength=strength, seed=seed + k, progress=False, **kwargs
        ).images
        colour, _, mask = judge(image)
        kept.append(iou(mask, foreground(source)) >= 0.6)
        recoloured.append(colour == new)
    return {
        "in place": float(np.mean(kept)),
        "new colour": float(np.mean(recoloured)),
        "both": float(np.mean(np.logical_and(kept, recoloured))),
    }


def unseen_shape_prompts(shape: str) -> list[str]:
    """16 prompts for a shape: every colour, each on two backgrounds."""
    return [prompt_for(colour, shape, background) for colour in NAMES for background in backgrounds(colour)]


def evaluate_unseen_shape(models, shape: str = "heart", seeds=(0, 1), cfg_scale: float = 7.5, **kwargs) -> float:
    """How often the judge, choosing among every shape it knows (the built-in model's and the unseen ones), reads
    `shape` in text-to-image generations of unseen_shape_prompts(shape), over `seeds`."""
    shapes = SHAPES + UNSEEN_SHAPES
    prompts = unseen_shape_prompts(shape)
    verdicts = [
        judge(image, shapes)[1] == shape
        for seed in seeds
        for image in draw(models, prompts, cfg_scale=cfg_scale, seed=seed, **kwargs)
    ]
    return float(np.mean(verdicts))


def inpainting_cases() -> list[tuple[Scene, Scene]]:
    """40 (scene, addition): a small or medium shape in the left column, every colour with every shape, and a new
    shape of another colour to paint into the right half, where the scene is empty."""
    cases, places = [], ("top", "middle", "bottom")
    for i, colour in enumerate(NAMES):
        for j, shape in enumerate(SHAPES):
            background = NAMES[(i + 3) % len(NAMES)]
            candidates = [c for c in NAMES if c not in (colour, background)]
            scene = Scene(shape, colour, background, ("small", "medium")[(i + j) % 2], f"{places[(i + j) % 3]} left")
            new_place = f"{places[(i + 2 * j) % 3]} right"
            new = Scene(
                SHAPES[(j + 1 + i % 4) % len(SHAPES)],
                candidates[(i + j) % len(candidates)],
                background,
                "medium",
                new_place,
            )
            cases.append((scene, new))
    return cases


def right_half_mask() -> Image.Image:
    """White (repaint) over the right half, less a 2-pixel gap from the centre line."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 + 2 :] = 255
    return Image.fromarray(mask)


def evaluate_inpainting(models, strength: float = 1.0, seed: int = 0, **kwargs) -> dict[str, float]:
    """Inpainting the right half of each case's scene with its addition's full description: how often the judge
    reads the addition's colour in the repainted half, and reads the scene's own shape, colour and place (IoU >= 0.8
    with its rendering) with the repainted half painted over in the background colour."""
    mask = right_half_mask()
    inside = np.asarray(mask) > 0
    painted, kept = [], []
    for k, (scene, new) in enumerate(inpainting_cases()):
        source = render(scene)
        (image,) = generate(
            describe(new),
            models,
            init_image=source,
            mask=mask,
            strength=strength,
            seed=seed + k,
            progress=False,
            **kwargs,
        ).images
        pixels = np.asarray(image).copy()
        half = Image.fromarray(pixels[:, SIZE // 2 + 2 :]).resize((SIZE, SIZE), Image.BILINEAR)
        painted.append(judge(half)[0] == new.colour)
        pixels[inside] = COLOURS[scene.background]
        colour, shape, found = judge(Image.fromarray(pixels))
        kept.append((colour, shape) == (scene.colour, scene.shape) and iou(found, foreground(source)) >= 0.8)
    return {"new colour": float(np.mean(painted)), "kept": float(np.mean(kept))}


def inpainting_sample(rng: np.random.Generator) -> tuple[Scene, Scene | None, np.ndarray]:
    """A training sample for an inpainting model: (scene, second shape or None, mask [64, 64] bool, True: repaint).
    Half the samples hold two shapes on opposite sides (left and right, or top and bottom), the second one's half
    masked: what a prompt for a new shape in an empty region asks. The others hold one shape under a box that covers
    it (40%), the whole image (30%: text-to-image) or a box anywhere (30%)."""
    scene = random_scene(rng)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if rng.random() < 0.5:
        vertical = rng.random() < 0.5  # the line between the halves
        here, there = (0, 2) if rng.random() < 0.5 else (2, 0)
        lines = ("top", "middle", "bottom") if vertical else ("left", "center", "right")
        sides = ("left", "right") if vertical else ("top", "bottom")

        def place(side: int) -> str:
            line, end = str(rng.choice(lines)), sides[side // 2]
            return f"{line} {end}" if vertical else f"{end} {line}"

        small = ("small", "medium")
        first = replace(scene, place=place(here), size=str(rng.choice(small)))
        colour = str(rng.choice([c for c in COLOURS if c != scene.background]))
        second = replace(random_scene(rng), colour=colour, background=scene.background, place=place(there))
        second = replace(second, size=str(rng.choice(small)))
        half = slice(SIZE // 2 + 2, None) if there == 2 else slice(None, SIZE // 2 - 2)
        if vertical:
            mask[:, half] = True
        else:
            mask[half, :] = True
        return first, second, mask
    kind = rng.random()
    if kind < 0.3:
        mask[:] = True
        return scene, None, mask
    (x, y), r = scene.center, scene.side / 2 + 2
    if kind < 0.7:  # a box over the shape, a few pixels larger on each side
        grow = rng.integers(0, 12, size=4)
        top, left = int(max(y - r - grow[0], 0)), int(max(x - r - grow[1], 0))
        bottom, right = int(min(y + r + grow[2], SIZE)), int(min(x + r + grow[3], SIZE))
    else:
        top, left = (int(v) for v in rng.integers(0, SIZE - 16, size=2))
        bottom, right = top + int(rng.integers(16, SIZE - top + 1)), left + int(rng.integers(16, SIZE - left + 1))
    mask[top:bottom, left:right] = True
    return scene, None, mask


def heat_map_prompts() -> list[tuple[str, str, str]]:
    """40 (prompt, shape, background): every colour with every shape, on the first of its backgrounds."""
    return [
        (prompt_for(colour, shape, backgrounds(colour)[0]), shape, backgrounds(colour)[0])
        for colour in NAMES
        for shape in SHAPES
    ]


def top_pixels(heat: torch.Tensor, count: int) -> np.ndarray:
    """[64, 64] bool: the `count` hottest pixels of a heat map."""
    flat = heat.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(count).indices] = True
    return mask.reshape(heat.shape).numpy()


def evaluate_heat_maps(models, seed: int = 0, **kwargs) -> dict[str, float]:
    """How often the heat map of the shape word, and of the background's colour word, lands on the shape: its
    hottest pixels, as many as the judge's foreground mask has, overlap that mask with IoU >= 0.5. kwargs:
    sd.study.attention_maps' (preset, resolutions, layers, at_steps) and generate's."""
    shape_hits, background_hits, shape_ious = [], [], []
    for k, (prompt, shape, background) in enumerate(heat_map_prompts()):
        result = attention_maps(prompt, models, seed=seed + k, progress=False, **kwargs)
        mask = foreground(result.image)
        count = max(int(mask.sum()), 1)
        shape_iou = iou(top_pixels(result.maps[shape], count), mask)
        shape_ious.append(shape_iou)
        shape_hits.append(shape_iou >= 0.5)
        background_hits.append(iou(top_pixels(result.maps[background], count), mask) >= 0.5)
    return {
        "shape word": float(np.mean(shape_hits)),
        "background word": float(np.mean(background_hits)),
        "shape word IoU": float(np.mean(shape_ious)),
    }
