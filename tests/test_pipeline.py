"""Text-to-image and image-to-image end to end against diffusers' pipelines, on the same seeded random weights:
the same seed gives the same latents and images, with every sampler."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from reference import (
    SAMPLER_CASES,
    SAMPLER_IDS,
    assert_close,
    diffusers_pipelines,
    diffusers_scheduler,
    ldm_key_shapes,
    our_models,
    pipeline_comparable_strength,
    random_checkpoint,
)

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.pipeline import generate

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=41)


@pytest.fixture(scope="module")
def models(checkpoint):
    return our_models(checkpoint, *CFGS)


@pytest.fixture(scope="module")
def models_float64(models):
    """The same networks in float64: the exact trajectory that float32 runs round away from."""
    copied = copy.deepcopy(models)
    for net in copied.named().values():
        net.double()
    return copied


@pytest.fixture(scope="module")
def pipelines(checkpoint, tmp_path_factory):
    return diffusers_pipelines(checkpoint, *CFGS, tmp_path_factory.mktemp("pipe"))


def init_image(width=64, height=48, seed=5) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def run_diffusers(pipeline, name, karras, seed, **kwargs):
    pipeline.scheduler = diffusers_scheduler(name, karras)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(generator=generator, **kwargs).images


def prompted_latents(models, pipeline, name, karras, seed, steps, ours, theirs):
    """Our latents and diffusers' for PROMPT and NEGATIVE with one sampler, seed and step count; ours and theirs are
    the remaining keywords of each."""
    mine = generate(
        PROMPT,
        models,
        negative_prompt=NEGATIVE,
        sampler=name,
        karras=karras,
        steps=steps,
        seed=seed,
        output_type="latent",
        progress=False,
        **ours,
    )
    expected = run_diffusers(
        pipeline,
        name,
        karras,
        seed,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        output_type="latent",
        **theirs,
    )
    return mine, expected


@pytest.mark.parametrize("name, karras", SAMPLER_CASES, ids=SAMPLER_IDS)
def test_text_to_image_latents_match_diffusers_for_the_same_seed(models, pipelines, name, karras):
    ours, expected = prompted_latents(
        models,
        pipelines[0],
        name,
        karras,
        seed=1234,
        steps=5,
        ours=dict(width=64, height=48, batch_size=2),
        theirs=dict(width=64, height=48, num_images_per_prompt=2),
    )
    assert ours.seed == 1234
    assert_close(ours.images, expected, f"txt2img {name} karras={karras} latents")


@pytest.mark.parametrize("name, karras", SAMPLER_CASES, ids=SAMPLER_IDS)
def test_image_to_image_latents_match_diffusers_for_the_same_seed(models, pipelines, name, karras):
    image, strength = init_image(), pipeline_comparable_strength(name, 0.6)
    ours, expected = prompted_latents(
        models,
        pipelines[1],
        name,
        karras,
        seed=77,
        steps=6,
        ours=dict(init_image=image, strength=strength),
        theirs=dict(image=image, strength=strength),
    )
    assert_close(ours.images, expected, f"img2img {name} karras={karras} latents")


def test_decoded_images_match_diffusers_pixels(models, pipelines):
    prompts, negatives = [PROMPT, "a red circle"], ["", "square"]
    ours = dict(negative_prompt=negatives, sampler="dpmpp_2m", steps=4, seed=9, width=48, height=64, progress=False)
    theirs = dict(prompt=prompts, negative_prompt=negatives, num_inference_steps=4, height=64, width=48)
    tensors = generate(prompts, models, output_type="tensor", **ours).images
    expected = run_diffusers(pipelines[0], "dpmpp_2m", False, 9, output_type="pt", **theirs)
    assert tensors.shape == (2, 3, 64, 48)
    assert_close(tensors, expected, "decoded images in [0, 1]")
    pil = generate(prompts, models, **ours).images
    for a, b in zip(pil, run_diffusers(pipelines[0], "dpmpp_2m", False, 9, **theirs)):
        difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
        assert difference <= 1, f"8-bit pixels differ by {difference}, more than 1"


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_image_to_image_strength_follows_diffusers(models, models_float64, pipelines, strength):
    image = init_image(56, 40, seed=8)
    settings = dict(sampler="ddim", steps=10, seed=3, init_image=image, strength=strength, output_type="latent")
    ours = generate(PROMPT, models, progress=False, **settings)
    if strength == 0:  # diffusers cannot run zero steps; ours returns the image's own latents
        mean, _ = models.encoder(
            torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        )
        assert ours.images.shape == mean.shape
        return
    expected = run_diffusers(
        pipelines[1],
        "ddim",
        False,
        3,
        prompt=PROMPT,
        image=image,
        strength=strength,
        num_inference_steps=10,
        output_type="latent",
    )
    # ten steps from (nearly) pure noise amplify float32 rounding, differently on different CPUs: allow twice our own
    # distance from float64 (the reference rounds too) on top of the usual 1e-4 of the scale
    exact = generate(PROMPT, models_float64, progress=False, **settings).images
    rounding = (ours.images.double() - exact).abs().max().item()
    assert_close(ours.images, expected, f"img2img strength {strength}", atol=2 * rounding)


def test_given_latents_no_guidance_and_ddim_eta_match_diffusers(models, pipelines):
    latents = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    ours = generate(
        PROMPT,
        models,
        sampler="ddim",
        eta=0.7,
        cfg_scale=1.0,
        steps=5,
        seed=5,
        width=64,
        height=48,
        latents=latents,
        output_type="latent",
        progress=False,
    )
    expected = run_diffusers(
        pipelines[0],
        "ddim",
        False,
        5,
        prompt=PROMPT,
        eta=0.7,
        guidance_scale=1.0,
        latents=latents,
        num_inference_steps=5,
        height=48,
        width=64,
        output_type="latent",
    )
    assert_close(ours.images, expected, "given latents, cfg 1, ddim eta 0.7")


def test_clip_skip_applies_to_the_prompt_and_the_negative_prompt(models, pipelines):
    """As A1111 does; diffusers' own clip_skip leaves the negative prompt unskipped, so it gets both embeddings."""
    ours = generate(
        PROMPT,
        models,
        negative_prompt=NEGATIVE,
        clip_skip=2,
        sampler="euler",
        steps=3,
        seed=6,
        width=32,
        height=32,
        output_type="latent",
        progress=False,
    )
    with torch.no_grad():
        tokens = models.tokenizer([PROMPT, NEGATIVE])
        embeds = models.clip(tokens, clip_skip=2)
    expected = run_diffusers(
        pipelines[0],
        "euler",
        False,
        6,
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="latent",
    )
    assert_close(ours.images, expected, "clip skip 2")


def test_a_seed_gives_the_same_images_again_and_none_draws_a_fresh_one(models):
    run = lambda seed: generate(
        "a cat", models, steps=2, seed=seed, width=32, height=32, output_type="latent", progress=False
    )
    first, again = run(42), run(42)
    assert torch.equal(first.images, again.images)
    unseeded = run(None)
    assert 0 <= unseeded.seed < 2**32 and torch.equal(run(unseeded.seed).images, unseeded.images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 500}, r"width must be a positive multiple of 8, got 500 \(try 496 or 504\)"),
        ({"height": 0}, r"height must be a positive multiple of 8, got 0"),
        ({"init_image": init_image(), "strength": 1.5}, r"strength must be between 0 and 1, got 1.5"),
        ({"sampler": "k_heun"}, r"unknown sampler 'k_heun'"),
        ({"output_type": "np"}, r"output_type must be one of pil, tensor, latent"),
        ({"init_image": "/nonexistent.png"}, r"init image /nonexistent.png: no such file"),
        ({"latents": torch.zeros(1, 4, 8, 8), "width": 32}, r"latents must have shape \(1, 4, 64, 4\)"),
    ],
    ids=["width", "height", "strength", "sampler", "output-type", "init-image", "latents"],
)
def test_bad_arguments_are_one_line_errors(models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate("a cat", models, steps=1, progress=False, **kwargs)


def test_an_unreadable_init_image_is_refused(models, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        generate("a cat", models, init_image=tmp_path / "broken.png", progress=False)


def test_a_float16_vae_overflow_is_decoded_again_in_float32(checkpoint):
    models = our_models(checkpoint, *CFGS)
    for net in models.named().values():
        net.half()
    with torch.no_grad():
        models.decoder.conv_in.weight *= 3000  # activations beyond float16's range, as SD's VAE reaches at 1024px
    with pytest.warns(UserWarning, match="the VAE decoder overflowed in float16; decoding in float32 from now on"):
        out = generate("a cat", models, steps=2, seed=1, width=32, height=32, output_type="tensor", progress=False)
    assert torch.isfinite(out.images).all() and models.decoder.conv_in.weight.dtype == torch.float32
