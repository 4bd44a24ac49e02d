"""The pictures in docs/, made by the built-in model: `python docs/pictures.py` rewrites them all.

heart-lora.png: "a COLOUR heart on a ... background" for every colour (seed 0), without the worked-example LoRA
(top row: the built-in model never saw a heart) and with weights/heart.safetensors at strength 1 (bottom row).
inpainting.png: three of the shapes world's inpainting cases (sd.shapes.inpainting_cases, seeds as the evaluation's),
each as the input, the mask (white: repaint) and the output with paste_back, for the new shape's full description.
"""

from pathlib import Path

from PIL import Image

from sd.images import grid
from sd.lora import load_lora
from sd.model_loader import load_models
from sd.pipeline import generate
from sd.shapes import describe, draw, inpainting_cases, render, right_half_mask, unseen_shape_prompts

DOCS = Path(__file__).resolve().parent
HEART = DOCS.parent / "weights" / "heart.safetensors"


def rows_grid(rows: list[list[Image.Image]]) -> Image.Image:
    return grid([image for row in rows for image in row], columns=len(rows[0]))


def heart_lora() -> None:
    models = load_models()
    prompts = unseen_shape_prompts("heart")[::2]  # one per colour
    without = draw(models, prompts, seed=0)
    lora = load_lora(models, HEART)
    with_lora = draw(models, prompts, seed=0)
    lora.remove()
    rows_grid([without, with_lora]).save(DOCS / "heart-lora.png")


def inpainting() -> None:
    models, mask = load_models(), right_half_mask()
    rows = []
    for k, (scene, new) in list(enumerate(inpainting_cases()))[:3]:
        source = render(scene)
        (image,) = generate(
            describe(new), models, init_image=source, mask=mask, strength=1.0, seed=k, paste_back=True, progress=False
        ).images
        rows.append([source, mask.convert("RGB"), image])
    rows_grid(rows).save(DOCS / "inpainting.png")


if __name__ == "__main__":
    heart_lora()
    inpainting()
