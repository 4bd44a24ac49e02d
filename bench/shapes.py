"""How well the built-in shapes model draws what it is asked, by the deterministic judge in sd/shapes.py.

    python bench/shapes.py [--ckpt weights/shapes.safetensors]

Text-to-image: 80 prompts (every colour with every shape, on two backgrounds), default sampler and steps; the share
whose image shows the prompt's colour and shape, at CFG 7.5, at CFG 1 (no guidance: the conditional prediction
alone) and from the empty prompt (the unconditional model: chance, about 1/8 for colour and 1/5 for shape).
Place and size: 45 full descriptions (every shape at every place); the share drawn nearest the asked place of the
3x3 grid (chance 1/9) and nearest the asked size (chance 1/3).
Image-to-image: 40 rendered shapes re-coloured by prompt at strength 0.6; the share that keeps the shape in place
(IoU >= 0.6) and the share that takes the new colour, with seed 0 (as the tests) and over seeds 0, 100 and 200. The
control asks for each shape's own colour instead.
Samplers: the same text-to-image prompts at CFG 7.5 and 3, and the re-colouring, with each sampler at 20 steps.

    python bench/shapes.py --lora weights/heart.safetensors [--shape heart]

    python bench/shapes.py --inpainting [MORE_CHECKPOINTS ...]

Inpainting (only this table), with the built-in model and any inpainting variants named: 40 scenes with a shape in
the left column, the right half repainted (strength 1) from the full description of a new shape of another colour
there; the share whose repainted half the judge reads in the new colour, and the share whose original shape is still
read right (colour, shape, IoU >= 0.8), without and with paste_back.

    python bench/shapes.py --speedups

What each speed-up costs in quality (only this table): the text-to-image and re-colouring scores with DeepCache at
several intervals and token merging (the built-in UNet has no attention at its top level, where ToMe merges by
default, so it is also measured one level down), against the plain UNet, with the seconds each evaluation took.

    python bench/shapes.py --study

The study tools on the built-in model (only these tables): where the word heat maps land (40 prompts, every colour
with every shape: how often the hottest pixels of the shape word's map, as many as the judge's foreground mask has,
overlap that mask with IoU >= 0.5, and of the background colour word's map), by preset, resolution and layer; and
the 80 text-to-image prompts' scores with each cross-attention layer ablated (every head switched off).

A LoRA that teaches the model a shape it never saw (only this table): how often the judge, choosing among all the
shapes it knows, reads that shape in 32 images (16 prompts asking for it, seeds 0 and 1) at LoRA strengths 0 to 1;
and the 80 text-to-image prompts' scores with the LoRA at strength 0, 1 and removed.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_table  # noqa: E402

from sd import study  # noqa: E402
from sd.lora import load_lora  # noqa: E402
from sd.model_loader import load_models  # noqa: E402
from sd.samplers import SAMPLERS  # noqa: E402
from sd.shapes import (  # noqa: E402
    evaluate_heat_maps,
    evaluate_inpainting,
    evaluate_placement,
    evaluate_recolouring,
    evaluate_text_to_image,
    evaluate_unseen_shape,
)
from sd.tome import token_merging  # noqa: E402

COLUMNS = {
    "colour": "colour right",
    "shape": "shape right",
    "place": "place right",
    "size": "size right",
    "kept": "shape kept in place",
}


def timed(evaluate, *args, **kwargs) -> tuple[dict[str, float], str]:
    start = time.perf_counter()
    scores = evaluate(*args, **kwargs)
    return scores, f"{time.perf_counter() - start:.1f}"


def mean(runs: list[dict[str, float]]) -> dict[str, float]:
    """The scores' means over runs: 40 edits score in steps of 2.5%, and seed to seed they vary by about 5 points."""
    return {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}


def row(task: str, seconds: str, **cells: str) -> list[str]:
    return [task, *(cells.get(key, "") for key in COLUMNS), seconds]


def pct(fraction: float) -> str:
    return f"{fraction:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="default: the built-in model")
    parser.add_argument("--lora", type=Path, help="judge this LoRA's new shape instead (only that table)")
    parser.add_argument("--shape", default="heart", help="the shape the LoRA teaches (default heart)")
    parser.add_argument(
        "--inpainting", nargs="*", type=Path, help="judge inpainting instead (only that table), also with these models"
    )
    parser.add_argument("--study", action="store_true", help="heat maps and ablations instead (only those tables)")
    parser.add_argument("--speedups", action="store_true", help="DeepCache and ToMe's quality instead (only that)")
    args = parser.parse_args()
    if args.speedups:
        speedup_table(load_models(args.ckpt))
        return
    if args.study:
        study_tables(load_models(args.ckpt))
        return
    if args.inpainting is not None:
        inpainting_table([args.ckpt, *args.inpainting])
        return
    models = load_models(args.ckpt)
    if args.lora:
        lora_table(models, args.lora, args.shape)
        return
    rows = []
    for label, cfg, prompted in (("CFG 7.5", 7.5, True), ("CFG 1.0", 1.0, True), ("empty prompt", 1.0, False)):
        scores, seconds = timed(evaluate_text_to_image, models, cfg_scale=cfg, prompted=prompted)
        rows.append(row(f"text-to-image, {label}", seconds, colour=pct(scores["colour"]), shape=pct(scores["shape"])))
    scores, seconds = timed(evaluate_placement, models)
    rows.append(
        row(
            "text-to-image, CFG 7.5, place and size asked",
            seconds,
            place=pct(scores["place"]),
            size=pct(scores["size"]),
        )
    )
    seeded = [timed(evaluate_recolouring, models, seed=seed) for seed in (0, 100, 200)]
    pooled = mean([scores for scores, _ in seeded]), f"{sum(float(seconds) for _, seconds in seeded):.1f}"
    for label, (scores, seconds) in (
        ("re-colouring", seeded[0]),
        ("re-colouring, seeds 0, 100, 200 (120 edits)", pooled),
        ("own colour asked (control)", timed(evaluate_recolouring, models, recolour=False)),
    ):
        kept = f"{pct(scores['in place'])} (both: {pct(scores['both'])})"
        rows.append(row(f"image-to-image, strength 0.6, {label}", seconds, colour=pct(scores["new colour"]), kept=kept))
    write_table(
        "shapes",
        f"Built-in shapes model ({models.source}): the judge's verdicts",
        ["task", *COLUMNS.values(), "seconds"],
        rows,
        [
            "Targets: colour >= 90% and shape >= 80% at CFG 7.5; re-colouring: new colour and in place >= 80%.",
            "Place and size have no target; chance is 11% and 33%.",
        ],
    )

    sampler_table(models)


def sampler_table(models) -> None:
    rows = []
    for name in SAMPLERS:
        start = time.perf_counter()
        strong, mild = (evaluate_text_to_image(models, sampler=name, cfg_scale=cfg) for cfg in (7.5, 3.0))
        recoloured = evaluate_recolouring(models, sampler=name)
        cells = [strong["colour"], strong["shape"], mild["colour"], mild["shape"]]
        cells += [recoloured["new colour"], recoloured["in place"]]
        rows.append([name, *map(pct, cells), f"{time.perf_counter() - start:.1f}"])
    write_table(
        "shapes-samplers",
        f"Built-in shapes model ({models.source}): the judge's verdicts by sampler, 20 steps",
        [
            "sampler",
            "colour, CFG 7.5",
            "shape, CFG 7.5",
            "colour, CFG 3",
            "shape, CFG 3",
            "re-colouring: new colour",
            "re-colouring: in place",
            "seconds",
        ],
        rows,
        ["Text-to-image: 80 prompts; re-colouring: 40 shapes at strength 0.6, CFG 7.5."],
    )


def lora_table(models, path: Path, shape: str) -> None:
    rows = []

    def judged(label: str, strength: float | None, scores: bool) -> None:
        """A row: `shape` prompts (and with `scores` the 80 prompts) with the LoRA at `strength`, None: without."""
        lora = None if strength is None else load_lora(models, path, strength=strength, mode="runtime")
        drawn, seconds = timed(lambda: {"drawn": evaluate_unseen_shape(models, shape)})
        cells = [pct(drawn["drawn"]), "", ""]
        if scores:
            guided, more = timed(evaluate_text_to_image, models)
            cells[1:] = pct(guided["colour"]), pct(guided["shape"])
            seconds = f"{float(seconds) + float(more):.1f}"
        rows.append([label, *cells, seconds])
        if lora is not None:
            lora.remove()

    judged("no LoRA", None, scores=True)
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
        judged(f"LoRA at strength {strength:g}", strength, scores=strength in (0.0, 1.0))
    judged("LoRA removed", None, scores=True)
    write_table(
        "shapes-lora",
        f"A LoRA ({path.name}) teaching the built-in model a {shape}",
        ["", f"{shape} drawn", "colour right (80 prompts)", "shape right (80 prompts)", "seconds"],
        rows,
        [
            f"{shape} drawn: the judge, choosing among every shape it knows, reads a {shape} in images for prompts"
            " asking for one (32 images: 16 prompts, seeds 0 and 1). The 80 prompts are the text-to-image"
            " evaluation's (the model's own five shapes). Targets: >= 80% drawn at strength 1 and <= 10% without;"
            " the 80 prompts' scores within 5 points of the model's own at strength 0 and removed.",
        ],
    )


def inpainting_table(checkpoints: list[Path | None]) -> None:
    rows = []
    for path in checkpoints:
        models = load_models(path)
        name = "built-in" if path is None else path.name
        for paste in (False, True):
            scores, seconds = timed(evaluate_inpainting, models, paste_back=paste)
            channels = models.diffusion.cfg.in_channels
            label = f"{name} ({channels}-channel UNet){', paste_back' if paste else ''}"
            rows.append([label, pct(scores["new colour"]), pct(scores["kept"]), seconds])
    write_table(
        "shapes-inpainting",
        "Inpainting the right half of 40 shapes scenes with a new shape",
        ["model", "new colour in the repainted half", "original shape kept", "seconds"],
        rows,
        ["Targets: new colour >= 80%, the original shape kept (colour, shape, IoU >= 0.8) >= 90%."],
    )


def speedup_table(models) -> None:
    settings = [("plain UNet", {}, 0)]
    settings += [(f"DeepCache N={n}", {"deepcache": n}, 0) for n in (2, 3, 5)]
    settings += [(f"DeepCache N=3, branch {b}", {"deepcache": (3, b)}, 0) for b in (2, 4)]
    settings += [("ToMe 0.5 (top level: no attention there, no change)", {"tome": 0.5}, 0)]
    settings += [
        ("ToMe 0.5 on the top two levels", {}, 1),
        ("ToMe 0.5 on the top two levels + DeepCache N=3", {"deepcache": 3}, 1),
    ]
    evaluate_text_to_image(models)  # a warm-up, so that the first row's seconds are like the others'
    rows = []
    for label, options, level in settings:
        merging = token_merging(models.diffusion, 0.5, max_level=level) if level else contextlib.nullcontext()
        with merging:
            drawn, seconds = timed(evaluate_text_to_image, models, **options)
            edited, more = timed(evaluate_recolouring, models, **options)
        seconds = f"{float(seconds) + float(more):.1f}"
        kept = f"{pct(edited['in place'])} (both: {pct(edited['both'])})"
        rows.append([label, pct(drawn["colour"]), pct(drawn["shape"]), pct(edited["new colour"]), kept, seconds])
    write_table(
        "shapes-speedups",
        f"The built-in model ({models.source}) with the speed-ups: the judge's verdicts",
        ["UNet", "colour", "shape", "re-coloured", "kept in place", "seconds"],
        rows,
        [
            "80 text-to-image prompts at CFG 7.5 and 40 re-colourings at strength 0.6 (bench/shapes.py's rows), 20"
            " steps.",
        ],
    )


def study_tables(models) -> None:
    rows = []
    cross = [name for name in study.attention_layers(models) if name.endswith("attn2")]
    settings = [
        ("DAAM preset: every level below the latents' size", {}),
        ("prompt-to-prompt preset", {"preset": "p2p"}),
    ]
    settings += [(f"the levels halved {k} times", {"resolutions": [k]}) for k in (1, 2)]
    settings += [(name, {"layers": name, "resolutions": [0, 1, 2, 3]}) for name in cross]
    for label, options in settings:
        scores, seconds = timed(evaluate_heat_maps, models, **options)
        rows.append(
            [
                label,
                pct(scores["shape word"]),
                pct(scores["background word"]),
                f"{scores['shape word IoU']:.2f}",
                seconds,
            ]
        )
    write_table(
        "study-heat-maps",
        f"Word heat maps of the built-in model ({models.source}): does the shape word's map land on the shape?",
        ["cross-attention layers", "shape word", "background colour word", "shape word's mean IoU", "seconds"],
        rows,
        [
            "Target: the shape word >= 80% and clearly above the background word. 40 prompts, seeds 0-39, 20 Euler a"
            " steps.",
        ],
    )
    rows = []
    scores, seconds = timed(evaluate_text_to_image, models)
    rows.append(["none", pct(scores["colour"]), pct(scores["shape"]), seconds])
    for name in cross:
        with study.ablate(models, name):
            scores, seconds = timed(evaluate_text_to_image, models)
        rows.append([name, pct(scores["colour"]), pct(scores["shape"]), seconds])
    write_table(
        "study-ablation",
        f"The built-in model ({models.source}) with one cross-attention layer switched off (every head)",
        ["ablated layer", "colour", "shape", "seconds"],
        rows,
        ["The 80 text-to-image prompts at CFG 7.5 (bench/shapes.py's first row)."],
    )


if __name__ == "__main__":
    main()
