"""Reading single-file checkpoints from disk (safetensors and pickles), and the `sd.inspect` report."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from reference import assert_close, ldm_key_shapes, our_networks, random_checkpoint
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.encoder import VAEConfig
from sd.model_converter import CheckpointError
from sd.model_loader import load_models

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=11)


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(checkpoint, folder / "tiny.safetensors")
    torch.save({"state_dict": checkpoint, "global_step": 1}, folder / "tiny.ckpt")
    return folder


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
@torch.no_grad()
def test_loaded_file_gives_the_networks_of_its_weights(checkpoint, files, name):
    loaded = load_models(files / name)
    assert (loaded.clip.cfg, loaded.encoder.cfg, loaded.diffusion.cfg) == CFGS, "configs read from shapes differ"
    expected = our_networks(checkpoint, *CFGS)
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
    assert_close(loaded.diffusion(latents, 500, context), expected["diffusion"](latents, 500, context), "UNet")
    tokens = torch.randint(0, 49408, (1, 77))
    assert_close(loaded.clip(tokens), expected["clip"](tokens), "CLIP")
    assert_close(loaded.decoder(latents), expected["decoder"](latents), "decoder")


def test_loading_in_half_precision_converts_every_weight(files):
    loaded = load_models(files / "tiny.safetensors", dtype=torch.float16)
    dtypes = {p.dtype for net in loaded.named().values() for p in net.parameters()}
    assert dtypes == {torch.float16}


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file; pass the path of an SD v1.x checkpoint"):
        load_models(tmp_path / "nothing.safetensors")


def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "sd.inspect", *args], capture_output=True, text=True, timeout=120)


def test_inspect_reports_sd_v15_parameter_counts_without_weights():
    result = run_inspect("--depth", "1")
    assert result.returncode == 0, result.stderr
    for line in ["diffusion    UNet           859,520,964", "total                     1,066,235,307", "time_embed"]:
        assert line in result.stdout, f"{line!r} missing from:\n{result.stdout}"


def test_inspect_reports_a_checkpoints_tree_and_dtype(files):
    result = run_inspect(str(files / "tiny.safetensors"), "--depth", "3")
    assert result.returncode == 0, result.stderr
    assert "(float32 weights)" in result.stdout
    assert "transformer_blocks" in result.stdout


def test_inspect_of_a_missing_file_exits_2_with_one_line(tmp_path):
    result = run_inspect(str(tmp_path / "missing.ckpt"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
