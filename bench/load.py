"""Loading a full SD v1.5 single-file checkpoint: ours against diffusers' `from_single_file`, and the raw read.

    python bench/load.py [--workdir /tmp/sd-bench] [--repeats 3]

The checkpoint holds seeded random weights in the public v1.5 layout (every key and shape), written once to the
work folder as fp32 and fp16 .safetensors and an fp32 .ckpt. Each measurement runs in a fresh process, so its peak
RSS is its own, with the file already in the page cache (the first, untimed run puts it there). "Load" ends when
every weight is in memory and usable: both sides then touch each page of every weight, since a memory-mapped load
that has not read its weights is not finished. diffusers loads the UNet, VAE and text encoder from one read of the
file, as its StableDiffusionPipeline.from_single_file does.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "data")]

from common import peak_rss_gib, write_table  # noqa: E402


def touch(modules) -> float:
    """Reads one value per 4 KiB page of every weight, so memory-mapped weights are really loaded."""

    total = 0.0
    for module in modules:
        for p in module.state_dict().values():
            if p.is_floating_point():
                total += float(p.reshape(-1)[:: 4096 // p.element_size()].float().sum())
    return total


def prepare(kind: str, path: Path):
    """Imports what loading `path` the `kind` way needs; returns the function that loads it."""
    import torch

    dtype = torch.float16 if "fp16" in path.name else torch.float32
    if kind == "raw":
        return lambda: open(path, "rb").readinto(bytearray(path.stat().st_size))
    if kind == "ours":
        from sd.model_loader import load_models

        return lambda: touch(load_models(path, dtype=dtype).named().values())

    load = diffusers_loader(path, dtype)
    return lambda: touch(load())


def diffusers_loader(path: Path, dtype):
    """Imports diffusers (so that a timed load leaves the imports out); returns the function that loads its UNet, VAE
    and CLIP text encoder from one read of the single file `path`, as StableDiffusionPipeline.from_single_file does
    (the CLIP config lives beside the file, see make_files)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from reference import original_config
    from transformers import CLIPTextModel

    from sd.autoencoder import VAEConfig
    from sd.diffusion import UNetConfig

    yaml = original_config(VAEConfig(), UNetConfig())

    def load() -> list:
        checkpoint = load_single_file_checkpoint(str(path))
        return [
            UNet2DConditionModel.from_single_file(checkpoint, original_config=yaml, torch_dtype=dtype),
            AutoencoderKL.from_single_file(checkpoint, original_config=yaml, torch_dtype=dtype),
            create_diffusers_clip_model_from_ldm(
                CLIPTextModel,
                checkpoint,
                config=str(path.parent / "clip-config"),
                subfolder="text_encoder",
                torch_dtype=dtype,
                local_files_only=True,
            ),
        ]

    return load


def diffusers_pipeline(path: Path):
    """diffusers' StableDiffusionPipeline on the single file `path` in float32 (Euler a, no safety checker, no
    progress bar)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from reference import diffusers_scheduler, diffusers_tokenizer

    unet, vae, text_encoder = diffusers_loader(path, torch.float32)()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=diffusers_tokenizer(path.parent / "tokenizer"),
        scheduler=diffusers_scheduler("euler_a"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def worker(kind: str, path: Path) -> dict:
    start = time.perf_counter()
    load = prepare(kind, path)
    imported = time.perf_counter()
    load()
    end = time.perf_counter()
    return {"seconds": end - imported, "with_imports": end - start, "peak_rss_gb": peak_rss_gib()}


def measure(kind: str, path: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats + 1):  # the first run warms the page cache and is dropped
        out = subprocess.run(
            [sys.executable, __file__, "--worker", kind, str(path)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs[1:]) for key in runs[0]}


def make_files(workdir: Path) -> list[Path]:
    import torch
    from reference import clip_text_config, public_key_shapes, random_checkpoint
    from safetensors.torch import save_file

    from sd.clip import CLIPConfig

    files = [workdir / "sd15-fp32.safetensors", workdir / "sd15-fp16.safetensors", workdir / "sd15-fp32.ckpt"]
    if all(f.exists() for f in files):
        return files
    workdir.mkdir(parents=True, exist_ok=True)
    clip_text_config(CLIPConfig()).save_pretrained(workdir / "clip-config" / "text_encoder")
    state = random_checkpoint(public_key_shapes(), seed=0)
    save_file(state, files[0])
    torch.save({"state_dict": state}, files[2])
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, files[1])
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return

    rows = []
    for path in make_files(args.workdir):
        raw, ours, ref = (measure(kind, path, args.repeats) for kind in ("raw", "ours", "diffusers"))
        rows.append(
            [
                path.name,
                f"{path.stat().st_size / 2**30:.2f}",
                f"{raw['seconds']:.2f}",
                f"{ours['seconds']:.2f}",
                f"{ref['seconds']:.2f}",
                f"{ours['seconds'] / ref['seconds']:.2f}",
                f"{ours['seconds'] / raw['seconds']:.2f}",
                f"{ours['with_imports']:.2f}",
                f"{ref['with_imports']:.2f}",
                f"{ours['with_imports'] / ref['with_imports']:.2f}",
                f"{ours['peak_rss_gb']:.2f}",
                f"{ref['peak_rss_gb']:.2f}",
                f"{raw['peak_rss_gb']:.2f}",
            ]
        )
    write_table(
        "load",
        "Loading a full SD v1.5 checkpoint (UNet + VAE + CLIP text), CPU",
        [
            "file",
            "GiB",
            "raw read s",
            "ours s",
            "diffusers s",
            "ours/diffusers",
            "ours/raw read",
            "ours s with imports",
            "diffusers s with imports",
            "ratio with imports",
            "ours peak RSS GiB",
            "diffusers peak RSS GiB",
            "raw read peak RSS GiB",
        ],
        rows,
        [
            f"Median of {args.repeats} warm-cache runs, each in a fresh process;",
            "load = until every weight is in memory",
            "(then touched page by page). 'with imports' adds importing the libraries, as a command-line run pays it.",
            "fp16 files load as fp16 on both sides; fp32 as fp32. Peak RSS: the process's VmHWM, imports included.",
        ],
    )


if __name__ == "__main__":
    main()
