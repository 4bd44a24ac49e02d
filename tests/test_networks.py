"""Our networks against diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel, with the
same seeded random weights in the public single-file layout, at small configs and several shapes."""

import dataclasses
from collections import Counter

import pytest
import torch
from reference import (
    assert_close,
    ldm_key_shapes,
    our_networks,
    random_checkpoint,
    reference_clip,
    reference_unet,
    reference_vae,
)

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig

CLIP_CFG, VAE_CFG, UNET_CFG = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()


def inputs(seed: int, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(CLIP_CFG, VAE_CFG, UNET_CFG), seed=0)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return our_networks(checkpoint, CLIP_CFG, VAE_CFG, UNET_CFG)


@pytest.fixture(scope="module")
def ref_unet(checkpoint):
    return reference_unet(checkpoint, VAE_CFG, UNET_CFG)


@pytest.fixture(scope="module")
def ref_vae(checkpoint):
    return reference_vae(checkpoint, VAE_CFG, UNET_CFG)


@pytest.fixture(scope="module")
def ref_clip(checkpoint, tmp_path_factory):
    return reference_clip(checkpoint, CLIP_CFG, tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize(
    "latent_shape, timesteps",
    [
        ((1, 4, 8, 8), torch.tensor([981])),
        ((2, 4, 8, 16), torch.tensor([1, 500])),  # non-square, batch 2, one timestep each
        ((2, 4, 16, 8), torch.tensor(250)),  # a scalar timestep for the whole batch
        ((1, 4, 9, 13), torch.tensor([999.5])),  # odd latent sides (a 72x104 image); a fractional timestep
    ],
    ids=["square", "wide-batch2", "tall-scalar-t", "odd-sides-float-t"],
)
@torch.no_grad()
def test_unet_predicts_the_same_noise_as_diffusers(ours, ref_unet, latent_shape, timesteps):
    latents, context = inputs(1, latent_shape, (latent_shape[0], 77, CLIP_CFG.width))
    assert_close(ours["diffusion"](latents, timesteps, context), ref_unet(latents, timesteps, context).sample, "UNet")


@torch.no_grad()
def test_inpainting_unet_with_nine_input_channels_matches_diffusers():
    unet_cfg = dataclasses.replace(UNetConfig.tiny(), in_channels=9)
    checkpoint = random_checkpoint(ldm_key_shapes(CLIP_CFG, VAE_CFG, unet_cfg), seed=3)
    ours = our_networks(checkpoint, CLIP_CFG, VAE_CFG, unet_cfg)["diffusion"]
    ref = reference_unet(checkpoint, VAE_CFG, unet_cfg)
    latents, context = inputs(2, (2, 9, 8, 8), (2, 77, CLIP_CFG.width))
    timesteps = torch.tensor([10, 990])
    out = ours(latents, timesteps, context)
    assert out.shape == (2, 4, 8, 8)
    assert_close(out, ref(latents, timesteps, context).sample, "inpainting UNet")


@pytest.mark.parametrize(
    "image_shape", [(1, 3, 64, 64), (2, 3, 64, 48), (1, 3, 72, 104)], ids=["square", "batch2", "odd-latent"]
)
@torch.no_grad()
def test_vae_encoder_gives_the_same_posterior_as_diffusers(ours, ref_vae, image_shape):
    (images,) = inputs(4, image_shape)
    images = images.clamp(-1, 1)
    mean, logvar = ours["encoder"](images)
    posterior = ref_vae.encode(images).latent_dist
    assert mean.shape == (image_shape[0], 4, image_shape[2] // 8, image_shape[3] // 8)
    assert_close(mean, posterior.mean, "VAE posterior mean")
    assert_close(logvar, posterior.logvar, "VAE posterior logvar")


@pytest.mark.parametrize("latent_shape", [(1, 4, 8, 8), (2, 4, 6, 10), (1, 4, 9, 13)], ids=["square", "batch2", "odd"])
@torch.no_grad()
def test_vae_decoder_gives_the_same_image_as_diffusers(ours, ref_vae, latent_shape):
    (latents,) = inputs(5, latent_shape)
    images = ours["decoder"](latents)
    assert images.shape == (latent_shape[0], 3, 8 * latent_shape[2], 8 * latent_shape[3])
    assert_close(images, ref_vae.decode(latents).sample, "VAE decoder")


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@torch.no_grad()
def test_clip_hidden_states_match_transformers(ours, ref_clip, clip_skip):
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, CLIP_CFG.vocab_size, (2, 77), generator=gen)
    tokens[:, 0], tokens[:, 20:] = 49406, 49407  # framed like a real prompt: start, words, end and padding
    ref = ref_clip(tokens, output_hidden_states=True)
    # clip_skip=k reads the output of the k-th layer from the end (hidden_states[-k]) through the final layer norm
    expected = ref.last_hidden_state if clip_skip == 1 else ref_clip.final_layer_norm(ref.hidden_states[-clip_skip])
    assert_close(ours["clip"](tokens, clip_skip=clip_skip), expected, f"CLIP, clip_skip={clip_skip}")


@torch.no_grad()
def test_clip_accepts_fewer_than_77_tokens(ours, ref_clip):
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    assert_close(ours["clip"](tokens), ref_clip(tokens).last_hidden_state, "CLIP on 7 tokens")


@torch.no_grad()
def test_random_weights_exercise_every_layer(ours):
    """Every leaf module runs in a forward pass and gives finite, non-constant outputs: the parity tests above
    therefore cover every layer, none hidden behind a zero weight."""
    seen = {}

    def record(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = (bool(torch.isfinite(out).all()), out.float().std().item())

        return hook

    handles = [
        module.register_forward_hook(record(f"{net}.{name}"))
        for net, model in ours.items()
        for name, module in model.named_modules()
        if not list(module.children()) and not isinstance(module, (torch.nn.Dropout, torch.nn.Identity))
    ]
    try:
        latents, context, images = inputs(7, (1, 4, 8, 8), (1, 77, CLIP_CFG.width), (1, 3, 64, 64))
        ours["clip"](torch.randint(0, 49408, (1, 77)))
        ours["encoder"](images.clamp(-1, 1))
        ours["decoder"](latents)
        ours["diffusion"](latents, torch.tensor([500]), context)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(handles), f"{len(handles) - len(seen)} of {len(handles)} layers never ran"
    bad = [name for name, (finite, std) in seen.items() if not finite or std < 1e-3]
    assert not bad, f"layers with non-finite or constant outputs: {bad[:5]}"


def test_clip_rejects_bad_clip_skip_and_too_many_tokens(ours):
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 3"):
        ours["clip"](torch.zeros(1, 77, dtype=torch.long), clip_skip=0)
    with pytest.raises(ValueError, match="at most 77 tokens"):
        ours["clip"](torch.zeros(1, 78, dtype=torch.long))


def norm_layers(model: torch.nn.Module) -> list[tuple]:
    """(kind, shape, eps) of every normalization layer."""
    layers = []
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            layers.append(("GroupNorm", m.num_groups, m.num_channels, m.eps))
        elif isinstance(m, torch.nn.LayerNorm):
            layers.append(("LayerNorm", m.normalized_shape, m.eps))
    return layers


def test_normalization_layers_and_epsilons_are_the_references(ours, ref_unet, ref_vae, ref_clip):
    """Epsilons move outputs by less than the parity tolerance on random inputs, so they are compared directly."""
    vae = torch.nn.ModuleList([ours["encoder"], ours["decoder"]])
    for what, mine, ref in [
        ("UNet", ours["diffusion"], ref_unet),
        ("VAE", vae, ref_vae),
        ("CLIP", ours["clip"], ref_clip),
    ]:
        only_ours = Counter(norm_layers(mine)) - Counter(norm_layers(ref))
        only_ref = Counter(norm_layers(ref)) - Counter(norm_layers(mine))
        assert not only_ours and not only_ref, (
            f"{what} norm layers: ours has {dict(only_ours)}, reference {dict(only_ref)}"
        )
