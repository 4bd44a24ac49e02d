"""Bad and careless input, class by class: each gets one `error:` line naming the argument or file and exit code 2
from the CLI (a ValueError or TypeError from the API) before any long work, writes nothing, and never leaves a
temporary file behind; images as phones and scanners make them are used as viewers show them."""

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import ldm_key_shapes, our_models, random_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

import convert_weights
import sd.cli
from sd.autoencoder import VAEConfig
from sd.cli import main
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.files import save_atomically
from sd.images import open_image
from sd.model_loader import load_models
from sd.models import CheckpointError
from sd.pipeline import StableDiffusion, generate
from sd.tokenizer import Tokenizer

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()
GIB = 2**30


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=29)


@pytest.fixture(scope="module")
def ckpt(checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(checkpoint, path)
    return path


@pytest.fixture
def models(checkpoint):
    return our_models(checkpoint, *CFGS)


@pytest.fixture
def never_loaded(monkeypatch):
    """Makes loading a model fail the test: what is checked must be checked before."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(sd.cli, "load_models", load)


def refused(capsys, argv: list[str], *names: str) -> str:
    """Runs the CLI, asserts exit code 2 and one `error:` line naming each of `names`; returns the line."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one error line: {err!r}"
    for name in names:
        assert name in err, f"the error does not name {name!r}: {err!r}"
    return err


def nothing_in(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def small_run(prompt: str, ckpt: Path, outdir: Path, *args: str) -> list[str]:
    """The command line of a one-step 16x16 generation."""
    return [prompt, "--ckpt", str(ckpt), "-W", "16", "-H", "16", "--steps", "1", "--outdir", str(outdir), *args]


# -- checked too late: every check that can be made before loading is made before loading -------------------------


def test_an_output_folder_that_is_a_file_is_refused_before_loading(tmp_path, capsys, never_loaded):
    (tmp_path / "outputs").write_text("a file")
    refused(capsys, ["a cat", "--outdir", str(tmp_path / "outputs")], "--outdir", "is a file")
    refused(capsys, ["a cat", "--outdir", str(tmp_path / "outputs" / "deeper")], "--outdir", "is a file")
    assert (tmp_path / "outputs").read_text() == "a file"


def test_an_unwritable_output_folder_is_refused_before_loading(tmp_path, capsys, never_loaded, monkeypatch):
    (tmp_path / "locked").mkdir()
    real_access = os.access
    # root may write anywhere, so the permission is denied through os.access, which the check asks
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "locked" else real_access(p, mode))
    refused(capsys, ["a cat", "--outdir", str(tmp_path / "locked" / "new")], "--outdir", "not writable")
    assert nothing_in(tmp_path / "locked")


@pytest.mark.parametrize(
    "args, names",
    [
        (["--seed", str(2**64)], ["--seed"]),
        (["-W", "0", "-H", "0"], ["width", "got 0"]),
        (["--steps", "1001"], ["--steps", "1000"]),
        (["--cfg", "inf"], ["--cfg", "finite"]),
        (["--cfg", "nan"], ["--cfg", "finite"]),
        (["--strength", "nan"], ["--strength", "finite"]),
        (["--clip-skip", "0"], ["--clip-skip"]),
        (["--attention-chunk", "0"], ["--attention-chunk"]),
        (["--batch", "0"], ["--batch"]),
    ],
    ids=["seed-2**64", "size-0", "steps-1001", "cfg-inf", "cfg-nan", "strength-nan", "clip-skip", "chunk", "batch"],
)
def test_bad_numbers_are_refused_before_loading(tmp_path, capsys, never_loaded, args, names):
    refused(capsys, ["a cat", "--outdir", str(tmp_path / "out"), *args], *names)
    assert nothing_in(tmp_path / "out")


def test_clip_skip_beyond_the_models_clip_is_refused_before_sampling(models):
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 3"):
        generate("a cat", models, clip_skip=4, steps=1, progress=False)


# -- tracebacks where one line was promised -----------------------------------------------------------------------


def test_an_unreadable_checkpoint_is_one_line(ckpt, tmp_path, capsys, never_loaded, monkeypatch):
    real_access, real_open = os.access, open
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ckpt else real_access(p, mode))
    refused(capsys, ["a cat", "--ckpt", str(ckpt), "--outdir", str(tmp_path)], "--ckpt", "not readable")
    refused(capsys, ["a cat", "--vae", str(ckpt), "--outdir", str(tmp_path)], "--vae", "not readable")

    def denied(file, *args, **kwargs):
        if Path(file) == ckpt:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(CheckpointError, match="cannot be read \\(Permission denied\\)"):
        load_models(ckpt)


def test_a_legacy_ckpt_cut_short_is_one_line(checkpoint, tmp_path):
    torch.save(checkpoint, tmp_path / "model.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "model.ckpt").read_bytes()[:1024])
    with pytest.raises(CheckpointError, match="cut.ckpt: truncated or corrupt checkpoint"):
        load_models(tmp_path / "cut.ckpt")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float64])
def test_weights_of_other_dtypes_are_refused_or_converted(checkpoint, tmp_path, dtype):
    key = "model.diffusion_model.out.2.weight"
    save_file(checkpoint | {key: checkpoint[key].to(dtype)}, tmp_path / "odd.safetensors")
    if dtype.is_floating_point:  # float64 converts like any float
        assert load_models(tmp_path / "odd.safetensors").diffusion.out[2].weight.dtype == torch.float32
    else:
        with pytest.raises(CheckpointError, match=f"non-float tensors: out.2.weight \\({dtype}\\)"):
            load_models(tmp_path / "odd.safetensors")


def native_file(ckpt: Path, folder: Path) -> tuple[dict, dict]:
    assert convert_weights.main([str(ckpt), str(folder / "native.safetensors"), "--dtype", "fp32"]) == 0
    with safe_open(folder / "native.safetensors", framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c: "{not json", "corrupt config metadata"),
        (lambda c: json.dumps(c | {"vae": c["vae"] | {"colour": 3}}), "unexpected keyword argument 'colour'"),
        (lambda c: json.dumps(c | {"diffusion": c["diffusion"] | {"heads": 0}}), "UNetConfig.heads must be positive"),
        (lambda c: json.dumps(c | {"clip": c["clip"] | {"layers": "3"}}), "CLIPConfig.layers must be positive"),
        (lambda c: json.dumps(c | {"diffusion": c["diffusion"] | {"heads": 5}}), "describe no network"),
        (lambda c: json.dumps([1, 2]), "corrupt config metadata"),
    ],
    ids=["not-json", "unknown-key", "heads-0", "string", "heads-not-dividing", "a-list"],
)
def test_native_files_with_corrupt_config_metadata_are_one_line(ckpt, tmp_path, corrupt, message):
    metadata, state = native_file(ckpt, tmp_path)
    metadata["configs"] = corrupt(json.loads(metadata["configs"]))
    save_file(state, tmp_path / "corrupt.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=message):
        load_models(tmp_path / "corrupt.safetensors")


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels in a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_and_a_folder_as_the_init_image_are_one_line(tmp_path, capsys, never_loaded):
    png_header_only(tmp_path / "bomb.png", 50000, 50000)
    refused(capsys, ["a cat", "--init-image", str(tmp_path / "bomb.png")], "bomb.png", "too many pixels")
    refused(capsys, ["a cat", "--init-image", str(tmp_path)], str(tmp_path), "is a directory")


def test_convert_weights_checks_its_paths_before_converting(ckpt, tmp_path, capsys, monkeypatch):
    def convert(*args: str) -> str:
        code = convert_weights.main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
        return err

    assert "does not exist" in convert(ckpt, tmp_path / "missing" / "out.safetensors")
    assert "is a folder" in convert(ckpt, tmp_path)
    real_access = os.access
    (tmp_path / "locked").mkdir()
    for denied, out, message in (
        (tmp_path / "locked", "locked/out.safetensors", "not writable"),
        (ckpt, "out.safetensors", "not readable"),
    ):
        monkeypatch.setattr(os, "access", lambda p, m, denied=denied: Path(p) != denied and real_access(p, m))
        assert message in convert(ckpt, tmp_path / out)
    assert nothing_in(tmp_path / "locked") and not (tmp_path / "out.safetensors").exists()


def test_a_damaged_hash_cache_is_replaced(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "sd").mkdir(parents=True)
    (tmp_path / "cache" / "sd" / "hashes.json").write_text("[1, 2, 3]")
    assert sd.cli.model_hash(ckpt) == sd.cli.model_hash(ckpt) and len(sd.cli.model_hash(ckpt)) == 10
    assert isinstance(json.loads((tmp_path / "cache" / "sd" / "hashes.json").read_text()), dict)


# -- wrong results with exit code 0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "plms", "dpmpp_2m"])
def test_every_step_count_up_to_1000_runs_and_more_is_refused(models, sampler):
    out = generate(
        "a cat", models, sampler=sampler, steps=1000, width=16, height=16, seed=1, output_type="latent", progress=False
    )
    assert torch.isfinite(out.images).all()
    start = generate(
        "a cat", models, sampler=sampler, steps=1, width=16, height=16, seed=1, output_type="latent", progress=False
    )
    assert not torch.equal(out.images, start.images), "1000 steps ended where one step does"
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        generate("a cat", models, sampler=sampler, steps=1001, progress=False)


@pytest.mark.parametrize("name", ["cfg_scale", "strength", "eta"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_numbers_are_refused(models, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        generate("a cat", models, sampler="ddim", progress=False, **{name: value})


def test_a_model_that_produces_nan_is_an_error_not_a_black_image(checkpoint, ckpt, tmp_path, capsys):
    key = "model.diffusion_model.out.2.weight"
    save_file(checkpoint | {key: torch.full_like(checkpoint[key], math.nan)}, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    argv = small_run("a cat", tmp_path / "nan.safetensors", out)
    assert main(argv) == 2
    *progress, last = capsys.readouterr().err.splitlines()  # the sampler's tqdm bar ran before the NaN showed
    assert last.startswith("error: the UNet produced NaN") and not any("error" in line for line in progress), last
    assert nothing_in(out)


def test_img2img_without_an_image_and_with_no_step_to_take_say_so(models):
    with pytest.raises(ValueError, match="img2img needs an image"):
        StableDiffusion(models).img2img("a cat", None)
    image = Image.new("RGB", (16, 16), "red")
    with pytest.warns(UserWarning, match="strength 0.05 of 10 steps takes no step"):
        generate("a cat", models, init_image=image, strength=0.05, steps=10, output_type="latent", progress=False)


# -- images as people have them ---------------------------------------------------------------------------------------


def test_an_exif_rotated_photo_is_used_upright(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high, as the camera stored it
    stored[:, :8] = 255  # the left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = np.asarray(open_image(tmp_path / "phone.jpg"))
    assert upright.shape == (16, 8, 3), f"not rotated: {upright.shape}"
    assert upright[:8].mean() > 200 and upright[8:].mean() < 50, "the white half should be on top, as viewers show it"


def test_a_16_bit_greyscale_png_keeps_its_grey(tmp_path):
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")
    grey = np.asarray(open_image(tmp_path / "scan.png"))
    assert np.all(grey == round(30000 * 255 / 65535)), f"30000 of 65535 should be grey 117, got {np.unique(grey)}"


# -- sizes that cannot fit --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, hint",
    [
        (["-W", "100000", "-H", "100000"], "draw a smaller size (-W/-H)"),
        (["-W", "64", "-H", "64", "--batch", "10000"], "fewer images (--batch)"),
        (["-W", "2048", "-H", "2048"], "add --tile-vae 512"),
    ],
    ids=["size", "batch", "tiles-fit"],
)
def test_a_generation_that_cannot_fit_is_refused_before_loading(
    ckpt, tmp_path, capsys, never_loaded, monkeypatch, args, hint
):
    monkeypatch.setattr(sd.cli, "available", lambda device: 2 * GIB)
    refused(capsys, ["a cat", "--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"), *args], "GiB", hint)
    assert nothing_in(tmp_path / "out")


def test_a_large_init_image_is_drawn_at_about_the_models_size(models, capsys):
    models.image_size = 64
    out = generate(
        "a cat", models, init_image=Image.new("RGB", (12000, 10000)), steps=1, output_type="latent", progress=False
    )
    p = out.parameters
    assert (p.width, p.height) == (64, 56) and "about the model's 64x64" in capsys.readouterr().out


# -- the Python API -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompt": None}, TypeError, "prompt must be a string or a list of strings"),
        ({"negative_prompt": 3}, TypeError, "negative_prompt must be a string"),
        ({"width": "64"}, TypeError, "width must be int or None, got str"),
        ({"steps": 2.5}, TypeError, "steps must be int, got float"),
        ({"seed": "abc"}, TypeError, "seed must be int or None, got str"),
        ({"seed": 2**64}, ValueError, "seed must be between 0 and 2\\*\\*64 - 1"),
        ({"cfg_scale": "7"}, TypeError, "cfg_scale must be a number, got str"),
        ({"progress": 1}, TypeError, "progress must be bool"),
    ],
    ids=["prompt", "negative", "width", "steps", "seed", "seed-range", "cfg", "progress"],
)
def test_wrong_argument_types_name_the_argument(models, kwargs, error, message):
    kwargs = {"prompt": "a cat"} | kwargs
    with pytest.raises(error, match=message):
        generate(kwargs.pop("prompt"), models, progress=kwargs.pop("progress", False), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_or_dtype_that_is_not_there_names_the_argument(models, ckpt):
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device"):
        generate("a cat", models, device="cuda", progress=False)
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device"):
        load_models(ckpt, device="cuda")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype .* got 'fp16'"):
        load_models(ckpt, dtype="fp16")


def test_without_a_size_the_api_draws_at_the_models_size(models):
    models.image_size = 32
    latents = generate("a cat", models, steps=1, output_type="latent", progress=False).images
    assert latents.shape[-2:] == (4, 4), f"32 pixels are 4 latents of the tiny VAE, got {tuple(latents.shape)}"


# -- small things users notice -------------------------------------------------------------------------------------


def test_seed_minus_one_draws_a_random_seed(ckpt, tmp_path, capsys):
    assert main(small_run("a cat", ckpt, tmp_path, "--seed", "-1")) == 0
    seed = int(capsys.readouterr().out.split("seed ")[1].split()[0])
    assert seed >= 0 and [p.name for p in tmp_path.iterdir()] == [f"00000-{seed}.png"]


def test_cfg_below_one_is_explained_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "1 or below means no guidance" in " ".join(capsys.readouterr().out.split())


def test_a_huge_prompt_warns_in_one_short_line():
    with pytest.warns(UserWarning) as caught:
        Tokenizer.from_bpe_file()("cat " * 25000)
    (warning,) = caught
    assert "\n" not in str(warning.message) and len(str(warning.message)) < 200, str(warning.message)[:300]


def test_a_nul_in_the_prompt_still_gives_a_valid_png(ckpt, tmp_path):
    argv = small_run("a\x00cat", ckpt, tmp_path, "--seed", "4")
    assert main(argv) == 0
    with Image.open(tmp_path / "00000-4.png") as png:
        png.verify()
    with Image.open(tmp_path / "00000-4.png") as png:
        assert png.text["parameters"].startswith("acat\n")


def test_ctrl_c_stops_with_one_line_and_no_files(ckpt, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sd.cli, "generate", interrupted)
    assert main(small_run("a cat", ckpt, tmp_path / "out")) == 130
    assert capsys.readouterr().err == "interrupted: nothing more was written\n"
    assert nothing_in(tmp_path / "out")

    monkeypatch.setattr(os, "link", interrupted)  # Ctrl-C while a PNG is being put in place
    with pytest.raises(KeyboardInterrupt):
        sd.cli.save_png(Image.new("RGB", (8, 8)), tmp_path / "out", "1", "info")
    assert nothing_in(tmp_path / "out"), list((tmp_path / "out").iterdir())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporary_files_of_killed_runs_are_removed_by_the_next(tmp_path):
    stale = [tmp_path / f".00003-7.png.sd-{dead_pid()}-1.tmp", tmp_path / f".model.safetensors.sd-{dead_pid()}-2.tmp"]
    live = tmp_path / f".00004-7.png.sd-{os.getpid()}-3.tmp"  # a run still writing
    for path in (*stale, live):
        path.write_bytes(b"half-written")
    sd.cli.save_png(Image.new("RGB", (8, 8)), tmp_path, "7", "info")
    assert not any(p.exists() for p in stale) and live.exists()
    stale = tmp_path / f".model.safetensors.sd-{dead_pid()}-4.tmp"
    stale.write_bytes(b"half-written")
    save_atomically({"x": torch.zeros(1)}, tmp_path / "model.safetensors", {})
    assert not stale.exists() and live.exists() and (tmp_path / "model.safetensors").is_file()
