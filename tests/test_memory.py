"""The memory features: attention slicing, tiled VAE, offloading idle networks; none changes the result beyond
what it must."""

import pytest
import torch
from reference import assert_close, ldm_key_shapes, our_models, random_checkpoint

from sd.attention import set_attention_chunk
from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.pipeline import decode, encode, generate, placed, tiled

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()


@pytest.fixture(scope="module")
def models():
    return our_models(random_checkpoint(ldm_key_shapes(*CFGS), seed=51), *CFGS)


@torch.no_grad()
def test_attention_slicing_gives_the_same_outputs(models):
    latents, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 128)
    expected_eps, expected_image = models.diffusion(latents, 500, context), models.decoder(latents)
    for net in models.named().values():
        set_attention_chunk(net, 7)
    try:
        assert_close(models.diffusion(latents, 500, context), expected_eps, "UNet with attention in chunks of 7")
        assert_close(models.decoder(latents), expected_image, "VAE decoder with attention in chunks of 7")
    finally:
        for net in models.named().values():
            set_attention_chunk(net, None)


def test_tiles_cover_the_image_and_their_weights_sum_to_one():
    """With the identity as the function, tiling must give back its input exactly: every pixel weighted to 1."""
    x = torch.randn(1, 3, 72, 104)
    for tile in (16, 32, 40):
        torch.testing.assert_close(tiled(lambda t: t, x, tile, 1), x)
    upsample = lambda t: t.repeat_interleave(4, -1).repeat_interleave(4, -2)
    torch.testing.assert_close(tiled(upsample, x, 24, 4), upsample(x))


def local_decoder() -> torch.nn.Module:
    """A VAE-decoder-shaped network (4 channels in, 4x upsampling, 3 out) whose output at a pixel depends on a few
    latents around it only: tiled and untiled outputs then differ by how well the tiles are blended, and by
    nothing else. (SD's decoder also normalises over the whole image (GroupNorm) and attends across it in its mid
    block, so tiling it changes a little more than this, as diffusers' tiled VAE does.)"""
    torch.manual_seed(0)
    conv = lambda c_in, c_out: torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    up = lambda: torch.nn.Upsample(scale_factor=2)
    return torch.nn.Sequential(conv(4, 16), torch.nn.SiLU(), up(), conv(16, 16), torch.nn.SiLU(), up(), conv(16, 3))


def cut_into_tiles(fn, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Tiling done naively, for comparison: side-by-side tiles, no overlap, no blending."""
    rows = range(0, z.shape[-2], tile)
    cols = range(0, z.shape[-1], tile)
    return torch.cat([torch.cat([fn(z[..., y : y + tile, x : x + tile]) for x in cols], -1) for y in rows], -2)


@torch.no_grad()
def test_tiled_decoding_shows_no_seams():
    decoder, z = local_decoder(), torch.randn(1, 4, 48, 48)
    whole = decoder(z)
    error = (tiled(decoder, z, 24, 4) - whole).abs().amax(dim=1)[0]  # [192, 192]
    seams = (cut_into_tiles(decoder, z, 24) - whole).abs().amax(dim=1)[0]
    scale = whole.abs().mean()
    assert error.mean() < 0.01 * scale, f"tiled decoding differs by {error.mean():.2e} on average (scale {scale:.2e})"
    assert error.max() < 0.1 * seams.max(), (
        f"blended tiles differ by up to {error.max():.2e}, barely better than cut tiles ({seams.max():.2e})"
    )


@torch.no_grad()
def test_decode_and_encode_run_their_networks_tile_by_tile(models):
    z = torch.randn(1, 4, 24, 24)
    expected = tiled(models.decoder, z / 0.18215, 8, 8)  # tiny VAE: 8x; tiles of 64 pixels are 8 latents
    torch.testing.assert_close(decode(models, z, tile=64), expected, rtol=0, atol=0)
    images = torch.rand(1, 3, 192, 192) * 2 - 1
    mean, logvar = encode(models, images, tile=64)
    moments = tiled(lambda t: torch.cat(models.encoder(t), dim=1), images, 64, 1 / 8)
    torch.testing.assert_close(torch.cat([mean, logvar], dim=1), moments, rtol=0, atol=0)


def test_generation_with_vae_tiles_bigger_than_the_image_is_unchanged(models):
    run = lambda tile: (
        generate(
            "a cat",
            models,
            steps=2,
            seed=3,
            width=64,
            height=64,
            vae_tile=tile,
            output_type="tensor",
            progress=False,
        ).images
    )
    assert torch.equal(run(None), run(512))


def test_offloaded_networks_visit_the_compute_device_for_their_turn_only(models, monkeypatch):
    moves = []
    monkeypatch.setattr(
        torch.nn.Module, "to", lambda self, *args, **kwargs: moves.append((type(self).__name__, str(args[0]))) or self
    )
    with placed(models.decoder, torch.device("cuda")):
        assert moves == [("Decoder", "cuda")]
    assert moves == [("Decoder", "cuda"), ("Decoder", "cpu")]
    moves.clear()
    with placed(models.decoder, torch.device("cpu")):
        pass
    assert moves == [], "a network already on the device is not moved"


def test_bf16_on_the_cpu_generates(models):
    for net in models.named().values():
        net.to(torch.bfloat16)
    try:
        image = generate(
            "a cat", models, steps=2, seed=3, width=32, height=32, output_type="tensor", progress=False
        ).images
        assert torch.isfinite(image).all()
    finally:
        for net in models.named().values():
            net.float()
