"""Fewer FLOPs per image: DeepCache and token merging against their reference implementations applied to diffusers
(DeepCache's DeepCacheSDHelper, the tomesd package) with the same random weights, and exact at their off settings;
the LCM sampler against diffusers' LCMScheduler is in test_samplers / test_pipeline with the other samplers."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference import (
    assert_close,
    diffusers_pipelines,
    diffusers_scheduler,
    ldm_key_shapes,
    our_models,
    random_checkpoint,
    speedup_references,
)

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.deepcache import DeepCache
from sd.diffusion import UNetConfig
from sd.pipeline import generate
from sd.sampling import CURRENT_STEP

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=43)


@pytest.fixture(scope="module")
def models(checkpoint):
    return our_models(checkpoint, *CFGS)


@pytest.fixture(scope="module")
def pipelines(checkpoint, tmp_path_factory):
    return diffusers_pipelines(checkpoint, *CFGS, tmp_path_factory.mktemp("pipe"))


def init_image(width=64, height=48, seed=5) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def ours(models, sampler="ddim", steps=7, **kwargs) -> torch.Tensor:
    options = dict(
        negative_prompt=NEGATIVE, sampler=sampler, steps=steps, seed=21, output_type="latent", progress=False
    )
    return generate(PROMPT, models, **{**options, **kwargs}).images


def theirs(pipeline, sampler="ddim", steps=7, deepcache=None, tome=0.0, **kwargs) -> torch.Tensor:
    """diffusers' latents for PROMPT and NEGATIVE, seed 21, with DeepCacheSDHelper and/or tomesd applied."""
    pipeline.scheduler = diffusers_scheduler(sampler)
    with speedup_references(pipeline, deepcache, tome):
        generator = torch.Generator("cpu").manual_seed(21)
        return pipeline(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            output_type="latent",
            generator=generator,
            **kwargs,
        ).images


def test_deepcache_every_step_is_the_plain_unet_bit_for_bit(models):
    plain = ours(models, width=64, height=48)
    assert torch.equal(ours(models, width=64, height=48, deepcache=1), plain)
    assert torch.equal(ours(models, width=64, height=48, deepcache=(1, 3)), plain)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_deepcache_equals_the_reference_helper_on_diffusers(models, pipelines, sampler):
    expected = theirs(pipelines[0], sampler, deepcache=(3, 0), width=64, height=48)
    cached = ours(models, sampler, width=64, height=48, deepcache=(3, 0))
    assert_close(cached, expected, f"DeepCache N=3 with {sampler}")
    plain = ours(models, sampler, width=64, height=48)
    assert (cached - plain).abs().max() > 1e-3, "DeepCache N=3 changed nothing: were the cached steps cached?"


def test_deepcache_image_to_image_equals_the_reference_helper(models, pipelines):
    image = init_image()
    expected = theirs(pipelines[1], deepcache=(2, 0), image=image, strength=0.8)
    assert_close(ours(models, init_image=image, strength=0.8, deepcache=2), expected, "DeepCache N=2 img2img")


def test_deepcache_runs_only_the_shallow_branch_between_full_steps(models):
    calls = []
    hooks = [
        block.register_forward_hook(lambda m, args, out, name=name: calls.append(name))
        for name, block in [
            ("input_blocks.1", models.diffusion.input_blocks[1]),
            ("middle", models.diffusion.middle_block),
        ]
    ]
    try:
        ours(models, steps=7, deepcache=(3, 1))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls.count("input_blocks.1") == 7, "branch 1 recomputes input_blocks[0..1] at every step"
    assert calls.count("middle") == 3, "the whole UNet at steps 0, 3 and 6 only"


def test_deepcache_keeps_deep_features_per_unet_call(models):
    """A prompt and a negative of different lengths take a UNet call each per step: each needs its own features."""
    gen = torch.Generator().manual_seed(0)
    short, long = torch.randn(1, 77, 128, generator=gen), torch.randn(1, 154, 128, generator=gen)
    shared, alone = DeepCache(models.diffusion, 2), DeepCache(models.diffusion, 2)
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 4, 8, 8, generator=gen)
            token = CURRENT_STEP.set((step, 500.0))
            try:
                shared(x, 500, long)
                assert torch.equal(shared(x, 500, short), alone(x, 500, short)), f"step {step}"
            finally:
                CURRENT_STEP.reset(token)


def test_deepcache_refuses_bad_settings(models):
    with pytest.raises(ValueError, match="interval is a number of steps, 1 or more"):
        ours(models, deepcache=0)
    with pytest.raises(ValueError, match="branch must be between 0 and 7 for this UNet"):
        ours(models, deepcache=(2, 8))
    with pytest.raises(ValueError, match="deepcache must be an interval N or a pair"):
        ours(models, deepcache=(2, 1, 0))
    assert DeepCache(models.diffusion, 3).branch == 0


def test_token_merging_ratio_0_is_the_plain_unet_bit_for_bit(models):
    assert torch.equal(ours(models, width=64, height=48, tome=0.0), ours(models, width=64, height=48))


@pytest.mark.parametrize("width, height", [(64, 64), (72, 40)], ids=["square", "odd-sides"])
def test_token_merging_equals_tomesd_on_diffusers(models, pipelines, width, height):
    expected = theirs(pipelines[0], tome=0.5, width=width, height=height)
    merged = ours(models, width=width, height=height, tome=0.5)
    assert_close(merged, expected, f"ToMe 0.5 at {width}x{height}")
    assert (merged - ours(models, width=width, height=height)).abs().max() > 1e-3, "ToMe 0.5 changed nothing"


def test_token_merging_and_deepcache_compose(models, pipelines):
    expected = theirs(pipelines[0], deepcache=(3, 0), tome=0.5, width=64, height=48)
    assert_close(ours(models, width=64, height=48, tome=0.5, deepcache=3), expected, "ToMe 0.5 with DeepCache N=3")


def test_a_batch_with_deepcache_and_token_merging_equals_the_references(models, pipelines):
    expected = theirs(pipelines[0], deepcache=(2, 1), tome=0.3, width=48, height=64, num_images_per_prompt=2)
    batch = ours(models, width=48, height=64, batch_size=2, tome=0.3, deepcache=(2, 1))
    assert_close(batch, expected, "a batch of 2, ToMe 0.3, DeepCache N=2 branch 1")


def test_inpainting_takes_both_and_is_unchanged_at_their_off_settings(models):
    image, mask = init_image(), Image.new("L", (64, 48), 0)
    mask.paste(255, (32, 0, 64, 48))
    plain = ours(models, init_image=image, mask=mask, strength=1.0)
    assert torch.equal(ours(models, init_image=image, mask=mask, strength=1.0, deepcache=1, tome=0.0), plain)
    sped = ours(models, init_image=image, mask=mask, strength=1.0, deepcache=3, tome=0.5)
    assert torch.isfinite(sped).all() and (sped - plain).abs().max() > 1e-3
