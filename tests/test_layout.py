"""Our module tree against the public SD v1.5 checkpoint: same keys, same shapes, same parameter counts."""

import dataclasses

import pytest
import torch
from reference import SCHEDULE_KEYS, ldm_key_shapes, public_key_shapes

from sd.autoencoder import VAEConfig
from sd.clip import CLIP, CLIPConfig
from sd.decoder import Decoder
from sd.diffusion import UNet, UNetConfig
from sd.encoder import Encoder
from sd.model_converter import from_ldm, to_ldm
from sd.model_loader import load_component
from sd.models import CheckpointError


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts_are_sd_v1s():
    with torch.device("meta"):
        counts = {
            "UNet": count(UNet()),
            "inpainting UNet": count(UNet(UNetConfig(in_channels=9))),
            "VAE": count(Encoder()) + count(Decoder()),
            "CLIP text": count(CLIP()),
        }
    expected = {"UNet": 859_520_964, "inpainting UNet": 859_535_364, "VAE": 83_653_863, "CLIP text": 123_060_480}
    assert counts == expected


@pytest.mark.parametrize("inpainting", [False, True], ids=["v1.5", "v1.5-inpainting"])
def test_our_modules_have_exactly_the_keys_and_shapes_of_the_public_checkpoint(inpainting):
    ours = ldm_key_shapes(CLIPConfig(), VAEConfig(), UNetConfig(in_channels=9 if inpainting else 4))
    public = public_key_shapes(inpainting)
    assert sorted(set(public) - set(ours)) == [], "public keys our modules lack"
    assert sorted(set(ours) - set(public)) == [], "keys our modules have that the public file lacks"
    wrong = {k: (ours[k][0], public[k][0]) for k in public if ours[k][0] != public[k][0]}
    assert not wrong, f"shapes differ (ours, public): {wrong}"


def test_converter_maps_every_public_key_and_names_the_ones_it_ignores():
    checkpoint = {k: torch.empty(shape, device="meta") for k, (shape, _) in public_key_shapes().items()}
    components, ignored = from_ldm(checkpoint)
    expected_ignored = set(SCHEDULE_KEYS) | {
        "model_ema.decay",
        "model_ema.num_updates",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }
    assert set(ignored) == expected_ignored
    with torch.device("meta"):
        nets = {"clip": CLIP(), "encoder": Encoder(), "decoder": Decoder(), "diffusion": UNet()}
    for name, net in nets.items():
        assert set(components[name]) == set(net.state_dict()), f"{name}: mapped keys differ from the module's"
    assert set(to_ldm(components)) == set(checkpoint) - expected_ignored, "to_ldm does not invert from_ldm"


def test_unknown_checkpoint_keys_are_an_error_that_names_them():
    checkpoint = {"model.diffusion_model.out.2.bias": torch.zeros(4), "lora_unet_down_blocks_0.alpha": torch.zeros(())}
    with pytest.raises(CheckpointError, match=r"1 keys of the checkpoint are not SD v1.x weights: lora_unet_down"):
        from_ldm(checkpoint)


def test_loading_weights_that_do_not_fit_names_missing_unexpected_and_misshapen_keys():
    cfg = dataclasses.replace(UNetConfig.tiny(), in_channels=9)
    with torch.device("meta"):
        state = UNet(cfg).state_dict()
        unet = UNet(UNetConfig.tiny())
    del state["out.2.bias"]
    state["out.3.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointError) as error:
        load_component(unet, state, "diffusion")
    message = str(error.value)
    assert "missing out.2.bias" in message
    assert "unexpected out.3.weight" in message
    assert "input_blocks.0.0.weight (32, 9, 3, 3) instead of (32, 4, 3, 3)" in message
