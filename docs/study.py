"""The pictures of docs/study.md, made by the built-in model with sd/study.py: `python docs/study.py [--out DIR]`."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from sd import study  # noqa: E402
from sd.images import grid  # noqa: E402
from sd.model_loader import load_models  # noqa: E402
from sd.pipeline import generate  # noqa: E402

PROMPT = "a red circle on a blue background"
ABLATED = "output_blocks.2.1.transformer_blocks.0.attn2"
ABLATION_PROMPTS = [
    "a yellow star on a purple background",
    "a green triangle on a red background",
    "a blue square on an orange background",
    "a white cross on a green background",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="where the PNGs go (default docs/)")
    out = parser.parse_args().out
    models = load_models(None)

    daam = study.attention_maps(PROMPT, models, seed=1, progress=False)
    decoder = study.attention_maps(PROMPT, models, seed=1, progress=False, layers="output_blocks.2")
    columns = len(daam.maps) + 1
    grid(daam.overlays() + decoder.overlays(), columns=columns).save(out / "study-heat-maps.png")

    strips = [
        study.trajectory(PROMPT, models, sampler=s, seed=1, steps=10, progress=False).strip()
        for s in ("euler_a", "ddim")
    ]
    grid(strips, columns=1).save(out / "study-steps.png")

    plain = generate(ABLATION_PROMPTS, models, seed=4, progress=False).images
    with study.ablate(models, ABLATED):
        ablated = generate(ABLATION_PROMPTS, models, seed=4, progress=False).images
    grid(plain + ablated, columns=len(plain)).save(out / "study-ablation.png")
    for name in ("study-heat-maps.png", "study-steps.png", "study-ablation.png"):
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
