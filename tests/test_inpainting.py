"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same seeded random weights, with a
9-channel (v1.5 inpainting) and a 4-channel UNet: the same seed gives the same latents and pixels; and what A1111
users expect on top (paste_back, mask blur) and the inputs it refuses."""

import dataclasses

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
)

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.images import image_to_tensor
from sd.pipeline import StableDiffusion, generate, image_latents

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"
WIDTH, HEIGHT = 64, 48


def configs(channels: int):
    return CLIPConfig.tiny(), VAEConfig.tiny(), dataclasses.replace(UNetConfig.tiny(), in_channels=channels)


@pytest.fixture(scope="module", params=[9, 4], ids=["9-channel", "4-channel"])
def setup(request, tmp_path_factory):
    """(our models, diffusers' inpainting pipeline) on one random checkpoint."""
    from diffusers import StableDiffusionInpaintPipeline

    cfgs = configs(request.param)
    checkpoint = random_checkpoint(ldm_key_shapes(*cfgs), seed=43)
    text_to_image, _ = diffusers_pipelines(
        {k: v.clone() for k, v in checkpoint.items()}, *cfgs, tmp_path_factory.mktemp("pipe")
    )
    return our_models(checkpoint, *cfgs), StableDiffusionInpaintPipeline(**text_to_image.components)


def picture(seed: int = 5) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def rectangle_mask(mode: str = "L") -> Image.Image:
    """White (repaint) over a 24x20 rectangle that does not fall on latent cells' edges, black elsewhere."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[10:30, 20:44] = 255
    return Image.fromarray(mask).convert(mode)


def theirs(pipeline, name: str, seed: int, **kwargs):
    pipeline.scheduler = diffusers_scheduler(name)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, generator=generator, **kwargs
    ).images


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m"])
def test_inpainting_latents_match_diffusers_for_the_same_seed(setup, name, strength):
    models, pipeline = setup
    image, mask = picture(), rectangle_mask()
    ours = generate(
        PROMPT,
        models,
        negative_prompt=NEGATIVE,
        sampler=name,
        steps=6,
        seed=11,
        init_image=image,
        mask=mask,
        strength=strength,
        batch_size=2,
        output_type="latent",
        progress=False,
    )
    expected = theirs(
        pipeline,
        name,
        11,
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=6,
        num_images_per_prompt=2,
        output_type="latent",
    )
    assert_close(ours.images, expected, f"inpainting {name} strength {strength} latents")


def test_inpainted_pixels_match_diffusers_within_one_level(setup):
    models, pipeline = setup
    image, mask = picture(6), rectangle_mask("RGB")
    settings = dict(image=image, mask_image=mask, strength=1.0, num_inference_steps=4, output_type="np")
    expected = theirs(pipeline, "euler_a", 3, **settings)
    ours = generate(
        PROMPT,
        models,
        negative_prompt=NEGATIVE,
        sampler="euler_a",
        steps=4,
        seed=3,
        init_image=image,
        mask=mask,
        strength=1.0,
        output_type="tensor",
        progress=False,
    )
    pixels = ours.images.permute(0, 2, 3, 1).numpy()
    assert np.abs(pixels - expected).max() <= 1 / 255, f"pixels differ by {np.abs(pixels - expected).max() * 255:.2f}"
    assert ours.parameters.mask_blur == 0 and ours.parameters.strength == 1.0


def test_paste_back_keeps_every_pixel_outside_the_mask(setup):
    models, _ = setup
    image, mask = picture(7), rectangle_mask()
    out = StableDiffusion(models).inpaint(PROMPT, image, mask, steps=3, seed=1, paste_back=True, progress=False)[0]
    outside = np.asarray(mask) == 0
    before, after = np.asarray(image), np.asarray(out)
    assert np.array_equal(after[outside], before[outside]), "paste_back changed pixels outside the mask"
    assert not np.array_equal(after[~outside], before[~outside]), "nothing was repainted inside the mask"
    plain = generate(PROMPT, models, steps=3, seed=1, init_image=image, mask=mask, strength=1.0, progress=False)
    assert not np.array_equal(np.asarray(plain.images[0])[outside], before[outside]), (
        "without paste_back the VAE's round trip should show outside the mask: the test would prove nothing"
    )


def test_a_blurred_paste_back_blends_over_the_edge_only(setup):
    models, _ = setup
    image, mask = picture(8), rectangle_mask()
    out = generate(
        PROMPT,
        models,
        steps=3,
        seed=2,
        init_image=image,
        mask=mask,
        strength=1.0,
        paste_back=True,
        mask_blur=4,
        progress=False,
    )
    assert out.parameters.mask_blur == 4
    far = np.ones((HEIGHT, WIDTH), dtype=bool)
    far[: 30 + 12, 20 - 12 : 44 + 12] = False  # 12 pixels or more from the rectangle (the blur reaches 10)
    assert np.array_equal(np.asarray(out.images[0])[far], np.asarray(image)[far])
    edge = (slice(10, 30), slice(44, 46))  # just outside the rectangle: part original, part repainted
    assert not np.array_equal(np.asarray(out.images[0])[edge], np.asarray(image)[edge])


def test_an_all_black_mask_returns_the_images_reconstruction_with_a_warning(setup):
    models, _ = setup
    image = picture(9)
    black = Image.new("L", (WIDTH, HEIGHT), 0)
    with pytest.warns(UserWarning, match="the mask is all black"):
        out = generate(PROMPT, models, steps=3, seed=4, init_image=image, mask=black, output_type="latent")
    own = image_latents(models, image_to_tensor(image, WIDTH, HEIGHT), torch.Generator().manual_seed(4), None)
    assert torch.equal(out.images, own), "not the image's own latents"


def test_a_mask_of_another_size_is_resized_to_the_image(setup):
    models, _ = setup
    image, mask = picture(10), rectangle_mask()
    big = mask.resize((WIDTH * 2, HEIGHT * 2), Image.NEAREST)
    settings = dict(steps=2, seed=5, init_image=image, strength=1.0, output_type="latent", progress=False)
    assert torch.equal(
        generate(PROMPT, models, mask=big, **settings).images, generate(PROMPT, models, mask=mask, **settings).images
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask="MASK"), "a mask marks what to repaint in an init image"),
        (dict(init_image="IMAGE", mask="MASK", mask_blur=4), "mask_blur softens the edge"),
        (dict(init_image="IMAGE", mask="MASK", mask_blur=-1), "mask_blur is a number of pixels"),
        (dict(init_image="IMAGE", paste_back=True), "apply to inpainting"),
    ],
)
def test_inpainting_arguments_are_checked_before_any_work(setup, kwargs, message):
    models, _ = setup
    kwargs = {k: picture() if v == "IMAGE" else rectangle_mask() if v == "MASK" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        generate(PROMPT, models, **kwargs)


def test_a_missing_mask_file_is_a_one_line_error(setup, tmp_path):
    models, _ = setup
    with pytest.raises(ValueError, match="no-such-mask.png"):
        generate(PROMPT, models, init_image=picture(), mask=tmp_path / "no-such-mask.png")


def test_only_masked_crops_and_fills_exactly_as_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    from sd.inpainting import crop_region, crop_resize, fill_resize

    processor = VaeImageProcessor(vae_scale_factor=8)
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(24, 120, size=2))
        mask = np.zeros((h, w), dtype=np.uint8)
        top, left = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        mask[top : top + int(rng.integers(1, h - top)), left : left + int(rng.integers(1, w - left))] = 255
        mask = Image.fromarray(mask)
        width, height, pad = (int(v) for v in (rng.integers(2, 12) * 8, rng.integers(2, 12) * 8, rng.integers(0, 20)))
        box = crop_region(mask, width, height, pad)
        assert box == processor.get_crop_region(mask, width, height, pad=pad), (mask.size, width, height, pad)
        piece = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).crop(box)
        for ours, theirs in ((fill_resize, processor._resize_and_fill), (crop_resize, processor._resize_and_crop)):
            assert np.array_equal(np.asarray(ours(piece, width, height)), np.asarray(theirs(piece, width, height)))


def test_only_masked_inpainting_matches_diffusers_padding_mask_crop(setup):
    models, pipeline = setup
    big = Image.fromarray(np.random.default_rng(12).integers(0, 256, (80, 112, 3), dtype=np.uint8))
    mask = Image.new("L", big.size, 0)
    mask.paste(255, (70, 12, 94, 30))
    settings = dict(sampler="euler_a", steps=4, seed=13, progress=False, width=WIDTH, height=HEIGHT)
    ours = generate(
        PROMPT, models, negative_prompt=NEGATIVE, init_image=big, mask=mask, padding_mask_crop=6, **settings
    )
    expected = theirs(
        pipeline, "euler_a", 13, image=big, mask_image=mask, strength=0.75, padding_mask_crop=6, num_inference_steps=4
    )
    assert ours.images[0].size == big.size and ours.parameters.padding_mask_crop == 6
    difference = np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(expected[0], dtype=int)).max()
    assert difference <= 1, f"only-masked pixels differ by {difference} levels"
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(ours.images[0])[outside], np.asarray(big)[outside])


def test_filled_masked_content_makes_the_result_independent_of_what_the_mask_covers(setup):
    models, _ = setup
    image, mask = picture(14), rectangle_mask()
    other = np.asarray(image).copy()
    other[np.asarray(mask) > 0] = 0  # the same picture, black where the mask repaints
    settings = dict(mask=mask, strength=0.6, steps=4, seed=6, output_type="latent", progress=False)
    results = {
        content: [generate(PROMPT, models, init_image=i, masked_content=content, **settings).images for i in pair]
        for content, pair in (("fill", (image, Image.fromarray(other))), ("original", (image, Image.fromarray(other))))
    }
    assert torch.equal(*results["fill"]), "with fill, what the mask covered still shows"
    assert not torch.equal(*results["original"]), "the control: with original content it should show"
    assert generate(PROMPT, models, init_image=image, **settings).parameters.masked_content is None


@pytest.mark.parametrize("content", ["latent nothing", "latent noise"])
def test_latent_masked_content_starts_the_masked_region_from_zero_or_fresh_noise(setup, content):
    from sd.inpainting import start
    from sd.pipeline import image_latents
    from sd.samplers import make_sampler

    models, _ = setup
    image, mask = image_to_tensor(picture(15), WIDTH, HEIGHT), torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., 16:40, 24:56] = 1  # on latent cells' edges: inside and outside are whole cells
    sampler = make_sampler("ddim")
    sampler.set_steps(10, 4)

    def started(content):
        generator = torch.Generator().manual_seed(8)
        latents_of = lambda pixels: image_latents(models, pixels, generator, None)  # noqa: E731
        return start(models, sampler, image, mask, 1, 4, 0.6, generator, latents_of, content)

    (x, state), (plain, _) = started(content), started("original")
    a = sampler.alphas_cumprod[sampler.timesteps[4]]
    inside = state.latent_mask.bool().expand_as(x)
    assert torch.equal(x[~inside], plain[~inside]), "outside the mask the start is the image's"
    begin = (x - (1 - a) ** 0.5 * state.first_noise) / a**0.5
    if content == "latent nothing":
        assert begin[inside].abs().max() < 1e-5, "the masked region did not start from zero latents"
    else:
        assert (
            0.8 < begin[inside].std() < 1.2
            and (begin - (plain - (1 - a) ** 0.5 * state.first_noise) / a**0.5)[inside].abs().max() > 0.1
        ), "the masked region did not start from fresh standard normal latents"
