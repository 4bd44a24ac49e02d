"""How well the built-in shapes model draws what it is asked, by the deterministic judge in sd/shapes.py.

    python bench/shapes.py [--ckpt weights/shapes.safetensors]

Text-to-image: 80 prompts (every colour with every shape, on two backgrounds), default sampler and steps; the share
whose image shows the prompt's colour and shape, at CFG 7.5, at CFG 1 (no guidance: the conditional prediction
alone) and from the empty prompt (the unconditional model: chance, about 1/8 for colour and 1/5 for shape).
Place and size: 45 full descriptions (every shape at every place); the share drawn nearest the asked place of the
3x3 grid (chance 1/9) and nearest the asked size (chance 1/3).
Image-to-image: 40 rendered shapes re-coloured by prompt at strength 0.6; the share that keeps the shape in place
(IoU >= 0.6) and the share that takes the new colour.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_table  # noqa: E402

from sd.model_loader import load_models  # noqa: E402
from sd.shapes import evaluate_placement, evaluate_recolouring, evaluate_text_to_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="default: the built-in model")
    args = parser.parse_args()
    models = load_models(args.ckpt)
    rows = []
    for label, cfg, prompted in (("CFG 7.5", 7.5, True), ("CFG 1.0", 1.0, True), ("empty prompt", 1.0, False)):
        start = time.perf_counter()
        scores = evaluate_text_to_image(models, cfg_scale=cfg, prompted=prompted)
        rows.append(
            [
                f"text-to-image, {label}",
                f"{scores['colour']:.0%}",
                f"{scores['shape']:.0%}",
                "",
                "",
                "",
                f"{time.perf_counter() - start:.1f}",
            ]
        )
    start = time.perf_counter()
    scores = evaluate_placement(models)
    rows.append(
        [
            "text-to-image, CFG 7.5, place and size asked",
            "",
            "",
            f"{scores['place']:.0%}",
            f"{scores['size']:.0%}",
            "",
            f"{time.perf_counter() - start:.1f}",
        ]
    )
    start = time.perf_counter()
    scores = evaluate_recolouring(models)
    rows.append(
        [
            "image-to-image re-colouring, strength 0.6",
            f"{scores['new colour']:.0%}",
            "",
            "",
            "",
            f"{scores['in place']:.0%} (both: {scores['both']:.0%})",
            f"{time.perf_counter() - start:.1f}",
        ]
    )
    write_table(
        "shapes",
        f"Built-in shapes model ({models.source}): the judge's verdicts",
        ["task", "colour right", "shape right", "place right", "size right", "shape kept in place", "seconds"],
        rows,
        [
            "Targets: colour >= 90% and shape >= 80% at CFG 7.5; re-colouring: new colour and in place >= 80%.",
            "Place and size have no target; chance is 11% and 33%.",
        ],
    )


if __name__ == "__main__":
    main()
