"""The synthetic shapes world and its judge; and the built-in model, judged."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd.model_loader import DEFAULT_CHECKPOINT, load_models
from sd.shapes import (
    COLOURS,
    PLACES,
    SHAPES,
    SIDES,
    UNSEEN_SHAPES,
    caption,
    evaluate_inpainting,
    evaluate_recolouring,
    evaluate_text_to_image,
    evaluate_unseen_shape,
    evaluation_prompts,
    judge,
    placement_scenes,
    placement_verdict,
    random_scene,
    recoloured,
    recolouring_cases,
    render,
)

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("shapes", [SHAPES, SHAPES + UNSEEN_SHAPES], ids=["the model's shapes", "and unseen ones"])
def test_the_judge_reads_every_rendered_scene_right(shapes):
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, shapes) for _ in range(300)]
    verdicts = [(s, judge(render(s), shapes)[:2]) for s in scenes]
    wrong = [(s, verdict) for s, verdict in verdicts if verdict != (s.colour, s.shape)]
    assert not wrong, f"{len(wrong)} misjudged, first: {wrong[:3]}"


def test_the_judge_reads_shapes_through_blur_and_noise():
    rng = np.random.default_rng(1)
    right = 0
    for _ in range(100):
        scene = random_scene(rng)
        pixels = np.asarray(
            render(scene).resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR), dtype=float
        )
        noisy = Image.fromarray(np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8))
        right += judge(noisy)[:2] == (scene.colour, scene.shape)
    assert right >= 90, f"only {right}/100 blurred, noisy scenes judged right"


def test_placement_verdict_knows_the_asked_place_and_size_from_every_other():
    misread = []
    for scene in placement_scenes():
        for place in PLACES:
            for size in SIDES:
                drawn = replace(scene, place=place, size=size, jitter=(1.5, -1.5))
                verdict = placement_verdict(scene, render(drawn))
                if verdict != (place == scene.place, size == scene.size):
                    misread.append((scene.place, scene.size, place, size, verdict))
    assert not misread, f"{len(misread)} of {45 * 27} drawn scenes misread, first: {misread[:3]}"


def test_captions_say_the_colour_and_shape_and_sometimes_more():
    rng = np.random.default_rng(2)
    captions = [(s, caption(s, rng)) for s in (random_scene(rng) for _ in range(200))]
    assert all(f"{s.colour} {s.shape}" in c for s, c in captions)
    assert any("background" in c for _, c in captions) and any("background" not in c for _, c in captions)
    assert len(evaluation_prompts()) == 80 and {c for _, c, _ in evaluation_prompts()} == set(COLOURS)
    assert {s for _, _, s in evaluation_prompts()} == set(SHAPES) and len(recolouring_cases()) == 40


def test_a_recoloured_scene_changes_only_the_shapes_colour_and_never_to_the_background():
    rng = np.random.default_rng(4)
    for scene in (random_scene(rng) for _ in range(200)):
        other = recoloured(scene, rng)
        assert other.colour not in (scene.colour, scene.background), f"{scene} recoloured {other.colour}"
        assert replace(other, colour=scene.colour) == scene, f"{scene} became {other}"


@pytest.fixture(scope="module")
def builtin():
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.fail(f"the built-in model {DEFAULT_CHECKPOINT} is missing")
    return load_models()


def test_builtin_model_is_small_native_and_records_how_it_was_trained(builtin):
    from safetensors import safe_open

    assert DEFAULT_CHECKPOINT.stat().st_size < 30e6
    assert builtin.format == "native" and builtin.image_size == 64
    with safe_open(DEFAULT_CHECKPOINT, framework="pt") as f:
        assert f.metadata()["command"].startswith("python -m sd.train --data shapes")


def test_builtin_model_draws_the_prompted_colour_and_shape(builtin):
    guided = evaluate_text_to_image(builtin)
    assert guided["colour"] >= 0.9 and guided["shape"] >= 0.8, guided


def test_builtin_model_recolours_a_shape_in_place(builtin):
    scores = evaluate_recolouring(builtin)
    # the shipped model keeps 85% in place and takes 92.5% of new colours (40 edits, 2.5% each; see bench/shapes.py)
    assert scores["in place"] >= 0.8 and scores["new colour"] >= 0.8, f"re-colouring targets are 80%: {scores}"


def test_image_to_image_keeps_a_shape_in_place_when_the_prompt_agrees_with_it(builtin):
    scores = evaluate_recolouring(builtin, recolour=False)
    # a model that moves shapes even when the prompt agrees with them cannot edit: 97.5% stays in place
    assert scores["in place"] >= 0.9 and scores["new colour"] >= 0.9, scores


def test_the_readme_demo_command_writes_a_png_with_the_builtin_model(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "demo.py"),
            "a red circle on a blue background",
            "--seed",
            "1",
            "--outdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "built-in shapes model; pass --ckpt for SD v1.x" in result.stdout
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (64, 64)


HEART = ROOT / "weights" / "heart.safetensors"


def test_the_heart_lora_teaches_the_builtin_model_a_shape_it_never_saw(builtin):
    from safetensors import safe_open

    from sd.lora import load_lora

    assert HEART.stat().st_size < 2e6, "the worked example LoRA is meant to be small"
    with safe_open(HEART, framework="pt") as f:
        assert f.metadata()["command"].startswith(
            "python -m sd.train --data shapes --shapes circle square triangle star cross heart"
        )
    base = evaluate_text_to_image(builtin)
    without = evaluate_unseen_shape(builtin, "heart")
    lora = load_lora(builtin, HEART)
    with_lora = evaluate_unseen_shape(builtin, "heart")
    lora.remove()
    assert with_lora >= 0.8 and without <= 0.1, f"hearts drawn: {with_lora:.0%} with the LoRA, {without:.0%} without"
    removed = evaluate_text_to_image(builtin)
    zero = load_lora(builtin, HEART, strength=0.0, mode="runtime")
    at_zero = evaluate_text_to_image(builtin)
    zero.remove()
    for case, scores in (("removed", removed), ("at strength 0", at_zero)):
        moved = max(abs(scores[k] - base[k]) for k in base)
        assert moved <= 0.05, f"the base model's scores {base} became {scores} with the LoRA {case}"


def test_inpainting_on_the_builtin_model_keeps_the_shape_and_paints_some_new_ones(builtin):
    """The issue's targets are 80% of new colours and 90% of shapes kept. Kept: 100% with paste_back, 50% without
    (decoding the whole latent moves the kept region's colours: the decoder's GroupNorm sees the new half too).
    New colours: 50% (bench/results/shapes-inpainting.md): a model that only ever saw one shape per image often
    leaves the second out (a 9-channel variant, sd.train --inpainting, paints 85%). This guards what the 4-channel
    path does; its 80% is not met."""
    scores = evaluate_inpainting(builtin, paste_back=True)
    assert scores["kept"] >= 0.9 and scores["new colour"] >= 0.4, scores
