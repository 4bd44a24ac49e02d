"""The full SD v1.5 networks (the public file's every key and shape) against diffusers/transformers: one forward
each at a small size, so the full depth and width are proven on every run in well under a minute."""

import gc

import pytest
import torch

from reference import (
    assert_close,
    our_networks,
    public_key_shapes,
    random_checkpoint,
    reference_clip,
    reference_unet,
    reference_vae,
)
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.encoder import VAEConfig

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
