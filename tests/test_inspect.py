"""The `sd.inspect` report of SD v1.5 and of a checkpoint file."""

import subprocess
import sys

import pytest
from reference import ldm_key_shapes, random_checkpoint
from safetensors.torch import save_file

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=11)


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(checkpoint, folder / "tiny.safetensors")
    return folder


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
