"""The full SD v1.5 networks (the public file's every key and shape) against diffusers/transformers: one forward
each at a small size, then text-to-image and image-to-image with every sampler at 64x64 pixels, so the full depth
and width are proven on every run within a couple of minutes."""

import gc
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import (
    assert_close,
    diffusers_pipelines,
    diffusers_scheduler,
    our_models,
    our_networks,
    pipeline_comparable_strength,
    public_key_shapes,
    random_checkpoint,
    reference_clip,
    reference_unet,
    reference_vae,
    speedup_references,
)
from safetensors.torch import save_file

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.pipeline import generate

CLIP_CFG, VAE_CFG, UNET_CFG = CLIPConfig(), VAEConfig(), UNetConfig()


@pytest.fixture(scope="module")
def checkpoint():
    state = random_checkpoint(public_key_shapes(), seed=1234)
    yield state
    state.clear()
    gc.collect()


@pytest.fixture(scope="module")
def ours(checkpoint):
    return our_networks(checkpoint, CLIP_CFG, VAE_CFG, UNET_CFG)


@pytest.fixture(scope="module")
def pipelines(checkpoint, tmp_path_factory):
    return diffusers_pipelines(checkpoint, CLIP_CFG, VAE_CFG, UNET_CFG, tmp_path_factory.mktemp("pipe"))


def inputs(seed: int, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


@torch.no_grad()
def test_full_size_unet_predicts_the_same_noise_as_diffusers(checkpoint, ours):
    latents, context = inputs(1, (1, 4, 32, 32), (1, 77, 768))
    timesteps = torch.tensor([981])
    expected = reference_unet(checkpoint, VAE_CFG, UNET_CFG)(latents, timesteps, context).sample
    assert_close(ours["diffusion"](latents, timesteps, context), expected, "full-size UNet")


@torch.no_grad()
def test_full_size_vae_matches_diffusers(checkpoint, ours):
    ref = reference_vae(checkpoint, VAE_CFG, UNET_CFG)
    images, latents = inputs(2, (1, 3, 256, 256), (1, 4, 32, 32))
    images = images.clamp(-1, 1)
    mean, logvar = ours["encoder"](images)
    posterior = ref.encode(images).latent_dist
    assert_close(mean, posterior.mean, "full-size VAE posterior mean")
    assert_close(logvar, posterior.logvar, "full-size VAE posterior logvar")
    assert_close(ours["decoder"](latents), ref.decode(latents).sample, "full-size VAE decoder")


@torch.no_grad()
def test_full_size_clip_matches_transformers(checkpoint, ours, tmp_path):
    ref = reference_clip(checkpoint, CLIP_CFG, tmp_path)
    tokens = torch.tensor([[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496] + [49407] * 66])
    out = ref(tokens, output_hidden_states=True)
    assert_close(ours["clip"](tokens), out.last_hidden_state, "full-size CLIP")
    assert_close(ours["clip"](tokens, clip_skip=2), ref.final_layer_norm(out.hidden_states[-2]), "CLIP, clip_skip=2")


SAMPLERS = ["ddpm", "ddim", "plms", "euler", "euler_a", "lms", "dpmpp_2m"]
PROMPT = "a photo of an astronaut riding a horse on mars"


@pytest.mark.parametrize("name", SAMPLERS)
def test_full_size_text_to_image_and_image_to_image_match_diffusers(checkpoint, pipelines, name):
    models = our_models(checkpoint, CLIP_CFG, VAE_CFG, UNET_CFG)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    strength = pipeline_comparable_strength(name, 0.7)
    runs = {
        "txt2img": ({"width": 64, "height": 64}, {"height": 64, "width": 64}, 0),
        "img2img": ({"init_image": image, "strength": strength}, {"image": image, "strength": strength}, 1),
    }
    for what, (our_kwargs, their_kwargs, pipeline) in runs.items():
        ours = generate(
            PROMPT,
            models,
            negative_prompt="blurry",
            sampler=name,
            steps=3,
            seed=2024,
            output_type="latent",
            progress=False,
            **our_kwargs,
        )
        pipelines[pipeline].scheduler = diffusers_scheduler(name)
        expected = pipelines[pipeline](
            PROMPT,
            negative_prompt="blurry",
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(2024),
            **their_kwargs,
        ).images
        assert_close(ours.images, expected, f"full-size {what} with {name}")


@torch.no_grad()
def test_full_size_lora_gives_diffusers_outputs_and_comes_off_bit_for_bit(ours, pipelines):
    from test_lora import kohya_lora

    from sd.lora import load_lora
    from sd.models import Models
    from sd.tokenizer import default_tokenizer

    models = Models(default_tokenizer(), **ours, source="memory", format="single-file")
    state = kohya_lora(models, 4, True, seed=9)
    latents, context = inputs(2, (1, 4, 16, 16), (1, 77, 768))
    timesteps = torch.tensor([500])
    pipeline = pipelines[0]
    pipeline.load_lora_weights(dict(state))  # PEFT layers beside the weights, which stay as they are
    try:
        expected = pipeline.unet(latents, timesteps, encoder_hidden_states=context).sample
    finally:
        pipeline.unload_lora_weights()
    path = Path(tempfile.mkdtemp()) / "lora.safetensors"
    save_file(state, path)
    before = {k: v.clone() for k, v in models.diffusion.state_dict().items() if "transformer_blocks.0.attn" in k}
    lora = load_lora(models, path)
    assert not lora.skipped, list(lora.skipped)[:5]
    assert_close(models.diffusion(latents, timesteps, context), expected, "full-size UNet with a LoRA")
    lora.remove()
    changed = [k for k, v in before.items() if not torch.equal(v, models.diffusion.state_dict()[k])]
    assert not changed, changed[:5]


@pytest.mark.parametrize("channels", [4, 9], ids=["4-channel", "9-channel"])
def test_full_size_inpainting_matches_diffusers(checkpoint, pipelines, channels):
    """The 9-channel case gives both UNets the same random 9-channel conv_in for the test's duration (a second
    full-size pipeline would double the memory)."""
    import dataclasses

    from diffusers import StableDiffusionInpaintPipeline

    models = our_models(checkpoint, CLIP_CFG, VAE_CFG, UNET_CFG)
    pipeline = StableDiffusionInpaintPipeline(**pipelines[0].components)
    original = pipeline.unet.conv_in
    if channels == 9:
        wide = torch.nn.Conv2d(9, 320, 3, padding=1)
        torch.nn.init.normal_(wide.weight, std=(9 * 9) ** -0.5, generator=torch.Generator().manual_seed(5))
        wide.bias.data = original.bias.detach().clone()
        models.diffusion.input_blocks[0][0] = wide
        models.diffusion.cfg = dataclasses.replace(models.diffusion.cfg, in_channels=9)
        pipeline.unet.conv_in = wide
        pipeline.unet.register_to_config(in_channels=9)
    try:
        image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (20, 12, 52, 44))
        ours = generate(
            PROMPT,
            models,
            sampler="euler_a",
            steps=3,
            seed=7,
            init_image=image,
            mask=mask,
            strength=1.0,
            output_type="latent",
            progress=False,
        )
        pipeline.scheduler = diffusers_scheduler("euler_a")
        expected = pipeline(
            PROMPT,
            image=image,
            mask_image=mask,
            height=64,
            width=64,
            strength=1.0,
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(7),
        ).images
    finally:
        pipeline.unet.conv_in = original
        pipeline.unet.register_to_config(in_channels=4)
    assert_close(ours.images, expected, f"full-size {channels}-channel inpainting")


@torch.no_grad()
def test_full_size_deepcache_and_token_merging_equal_their_references(checkpoint, pipelines):
    """SD v1's own branch numbering (two ResNets and a downsampler per level): branch 2 is input_blocks[:3]."""
    models = our_models(checkpoint, CLIP_CFG, VAE_CFG, UNET_CFG)
    options = dict(negative_prompt="blurry", sampler="ddim", steps=4, seed=8, output_type="latent", progress=False)
    ours = generate(PROMPT, models, width=64, height=64, deepcache=(3, 2), tome=0.5, **options).images
    pipelines[0].scheduler = diffusers_scheduler("ddim")
    with speedup_references(pipelines[0], deepcache=(3, 2), tome=0.5) as pipeline:
        generator = torch.Generator().manual_seed(8)
        expected = pipeline(
            PROMPT,
            negative_prompt="blurry",
            num_inference_steps=4,
            height=64,
            width=64,
            output_type="latent",
            generator=generator,
        ).images
    assert_close(ours, expected, "full-size DeepCache N=3 branch 2 with ToMe 0.5")
