"""demo.py / `python -m sd`: PNGs with A1111-readable parameters, never an overwrite, one-line errors and exit code 2
for bad input with nothing written."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import ldm_key_shapes, random_checkpoint
from safetensors.torch import save_file

from sd.autoencoder import VAEConfig
from sd.cli import main
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig

ROOT = Path(__file__).parents[1]
# A1111's reader of the `parameters` text (modules/infotext_utils.py): "Key: value" pairs on the last line
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_parameters(path: Path) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields), parsed the way A1111's PNG-info does."""
    *lines, last = Image.open(path).text["parameters"].strip().split("\n")
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt:"))
    negative = next((line[16:].strip() for line in lines if line.startswith("Negative prompt:")), "")
    return prompt, negative, {k.strip(): v.strip() for k, v in A1111_PARAM.findall(last)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-model.safetensors"
    save_file(random_checkpoint(ldm_key_shapes(CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()), seed=3), path)
    return path


def demo(ckpt: Path, outdir: Path, *args: str) -> int:
    return main(
        ["a red circle", "--ckpt", str(ckpt), "--outdir", str(outdir), "-W", "64", "-H", "48", "--steps", "3", *args]
    )


def test_png_carries_parameters_that_a1111_reads_back(ckpt, tmp_path, capsys):
    assert (
        demo(
            ckpt,
            tmp_path,
            "--seed",
            "42",
            "--negative",
            "blurry",
            "--sampler",
            "dpmpp_2m",
            "--karras",
            "--clip-skip",
            "2",
        )
        == 0
    )
    assert "seed 42" in capsys.readouterr().out
    (png,) = sorted(tmp_path.glob("*.png"))
    assert png.name == "00000-42.png" and Image.open(png).size == (64, 48)
    prompt, negative, fields = read_parameters(png)
    assert (prompt, negative) == ("a red circle", "blurry")
    expected = {
        "Steps": "3",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.5",
        "Seed": "42",
        "Size": "64x48",
        "Model": "tiny-model",
        "Clip skip": "2",
    }
    assert {k: fields[k] for k in expected} == expected
    assert re.fullmatch(r"[0-9a-f]{10}", fields["Model hash"])


def test_image_to_image_records_its_denoising_strength(ckpt, tmp_path):
    Image.new("RGB", (40, 32), "blue").save(tmp_path / "init.png")
    assert (
        demo(
            ckpt,
            tmp_path / "out",
            "--init-image",
            str(tmp_path / "init.png"),
            "--strength",
            "0.6",
            "-W",
            "40",
            "-H",
            "32",
            "--seed",
            "1",
        )
        == 0
    )
    (png,) = (tmp_path / "out").glob("*.png")
    assert read_parameters(png)[2]["Denoising strength"] == "0.6" and Image.open(png).size == (40, 32)


def test_inpainting_records_its_mask_blur_and_keeps_the_pixels_outside_the_mask(ckpt, tmp_path):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[8:40, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "1"]
    assert demo(ckpt, tmp_path / "out", *args, "--paste-back", "--mask-blur", "2", "--seed", "1") == 0
    (png,) = (tmp_path / "out").glob("*.png")
    fields = read_parameters(png)[2]
    assert fields["Mask blur"] == "2" and fields["Denoising strength"] == "1.0", fields
    assert "Inpaint area" not in fields
    far = np.ones((48, 64), dtype=bool)
    far[:, 24:] = False  # the blur reaches 5 pixels
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB"))[far], np.asarray(init)[far])


def test_only_masked_inpainting_keeps_the_images_size_and_records_its_padding(ckpt, tmp_path):
    Image.new("RGB", (96, 72), "blue").save(tmp_path / "init.png")
    mask = Image.new("L", (96, 72), 0)
    mask.paste(255, (60, 10, 80, 30))
    mask.save(tmp_path / "mask.png")
    args = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--only-masked", "8"]
    assert demo(ckpt, tmp_path / "out", *args) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    fields = read_parameters(png)[2]
    assert Image.open(png).size == (96, 72), "the output is the init image's size, with the crop pasted in"
    assert fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == "8", fields


def test_outpainting_extends_the_canvas_and_keeps_the_image_with_paste_back(ckpt, tmp_path):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    args = ["--init-image", str(tmp_path / "init.png"), "--outpaint", "8,0,8,16", "--strength", "1", "--paste-back"]
    assert demo(ckpt, tmp_path / "out", *args, "-W", "64", "-H", "48") == 0
    (png,) = (tmp_path / "out").glob("*.png")
    out = np.asarray(Image.open(png).convert("RGB"))
    assert out.shape == (48, 64, 3) and np.array_equal(out[:32, 8:56], np.asarray(init))
    assert demo(ckpt, tmp_path / "bad", "--init-image", str(tmp_path / "init.png"), "--outpaint", "8,0") == 2


def test_a_batch_gives_numbered_images_and_a_grid_and_nothing_is_overwritten(ckpt, tmp_path):
    (tmp_path / "00003-99.png").write_bytes(b"someone's image")
    assert demo(ckpt, tmp_path, "--batch", "3", "--seed", "5") == 0
    assert demo(ckpt, tmp_path, "--seed", "5") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00003-99.png", "00004-5.png", "00005-5.png", "00006-5.png", "00007-grid-5.png", "00008-5.png"]
    assert (tmp_path / "00003-99.png").read_bytes() == b"someone's image"
    assert Image.open(tmp_path / "00007-grid-5.png").size == (128, 96)
    assert read_parameters(tmp_path / "00005-5.png")[2]["Batch pos"] == "1"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-W", "100"], "error: width must be a positive multiple of 8, got 100 (try 96 or 104)"),
        (["--strength", "1.5", "--init-image", "x.png"], "error: --strength must be between 0 and 1, got 1.5"),
        (["--init-image", "{tmp}/broken.png"], "error: init image {tmp}/broken.png: not a readable image"),
        (["--init-image", "{tmp}/missing.png"], "error: init image {tmp}/missing.png: no such file"),
        (["--sampler", "heun"], "error: argument --sampler: invalid choice: 'heun'"),
        (["--init-image", "{tmp}/init.png", "--mask", "{tmp}/missing.png"], "error: mask {tmp}/missing.png: no such"),
        (["--mask", "{tmp}/init.png"], "error: --mask marks what to repaint in an image: add --init-image"),
        (
            ["--init-image", "{tmp}/init.png", "--mask", "{tmp}/init.png", "--mask-blur", "4"],
            "error: --mask-blur softens",
        ),
        (["--ckpt", "{tmp}/missing.ckpt"], "error: --ckpt {tmp}/missing.ckpt: no such file or folder"),
        (["--ckpt", "{tmp}/broken.png"], "error: {tmp}/broken.png: not a checkpoint"),
        (["--sampler", "euler_a", "--karras"], "error: the Euler a sampler has no Karras schedule"),
        (["--tile-vae", "100"], "error: --tile-vae must be a multiple of 32, at least 64, got 100"),
        pytest.param(
            ["--device", "cuda"],
            "error: --device cuda: no CUDA device on this machine; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
    ids=[
        "size",
        "strength",
        "unreadable-image",
        "missing-image",
        "sampler",
        "missing-mask",
        "mask-alone",
        "blur-without-paste",
        "missing-ckpt",
        "not-a-ckpt",
        "karras",
        "tile",
        "device",
    ],
)
def test_bad_input_is_one_line_exit_code_2_and_writes_nothing(ckpt, tmp_path, args, message):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 48), "white").save(tmp_path / "init.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    ckpt_args = [] if "--ckpt" in args else ["--ckpt", str(ckpt)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "a cat", *ckpt_args, *args, "--outdir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message.replace("{tmp}", str(tmp_path))) and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_speed_and_memory_options_run(ckpt, tmp_path):
    assert (
        demo(
            ckpt,
            tmp_path,
            "--seed",
            "2",
            "--tile-vae",
            "64",
            "--attention-chunk",
            "16",
            "--channels-last",
            "--low-vram",
        )
        == 0
    )
    assert [p.name for p in tmp_path.iterdir()] == ["00000-2.png"]


def test_python_m_sd_is_the_same_command(ckpt, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd",
            "a cat",
            "--ckpt",
            str(ckpt),
            "-W",
            "32",
            "-H",
            "32",
            "--steps",
            "1",
            "--seed",
            "3",
            "--outdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Euler a" in result.stderr, "tqdm progress over the steps"
    assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]
