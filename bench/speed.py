"""Speed and memory of the full SD v1.5 networks, ours against diffusers, on the same machine in the same run.

    python bench/speed.py [--repeats 3] [--steps 20] [--skip-e2e]

Seeded random weights in the public v1.5 single-file layout (the same tensors for both sides), fp32 on the CPU, and
fp16 on CUDA when there is a GPU; the same thread count for both; one warm-up run, then the median of `--repeats`.
Rows: UNet forward (batch 2 as classifier-free guidance does, 4x64x64 latents, 77 tokens), VAE decode 64x64 ->
512x512, VAE encode 512x512, CLIP encode, and a whole text-to-image generation (512x512, `--steps` Euler a steps),
each side in its own process from the checkpoint file, with that process's peak RSS. Loading is bench/load.py's.
The UNet's FLOPs per step come from torch.utils.flop_counter; GFLOP/s is set against the machine's matmul peak.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "data")]

from common import median_seconds, peak_rss_gib, write_table  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """What a large square matmul achieves: the practical peak the networks' FLOPs are measured against."""
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    seconds = median_seconds(
        lambda: torch.mm(a, a) if device.type == "cpu" else (torch.mm(a, a), torch.cuda.synchronize()), 3, 1
    )
    return 2 * 4096**3 / seconds / 1e9


def unet_gflop() -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from sd.diffusion import UNet

    with torch.device("meta"):
        unet = UNet()
        latents, context = torch.empty(2, 4, 64, 64), torch.empty(2, 77, 768)
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([500, 500], device="meta"), context)
    return counter.get_total_flops() / 1e9


def networks_rows(device: torch.device, dtype: torch.dtype, repeats: int, gflop: float, peak: float) -> list[list]:
    from reference import (
        our_networks,
        public_key_shapes,
        random_checkpoint,
        reference_clip,
        reference_unet,
        reference_vae,
    )

    from sd.autoencoder import VAEConfig
    from sd.clip import CLIPConfig
    from sd.diffusion import UNetConfig

    cfgs = CLIPConfig(), VAEConfig(), UNetConfig()
    checkpoint = {
        k: v.to(device, dtype) if v.is_floating_point() else v
        for k, v in random_checkpoint(public_key_shapes()).items()
    }
    ours = our_networks(checkpoint, *cfgs)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = {
            "unet": reference_unet(checkpoint, cfgs[1], cfgs[2]),
            "vae": reference_vae(checkpoint, cfgs[1], cfgs[2]),
            "clip": reference_clip(checkpoint, cfgs[0], Path(tmp)),
        }
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=gen).to(device, dtype)
    small_latents = latents[:1]
    images = torch.rand(1, 3, 512, 512, generator=gen).to(device, dtype) * 2 - 1
    context = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    tokens = torch.randint(0, 49408, (2, 77), generator=gen).to(device)
    t = torch.tensor([500, 500], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(fn):
        def run():
            with torch.inference_mode():
                fn()
            sync()

        return median_seconds(run, repeats, 1)

    cases = [
        (
            "UNet forward, batch 2, 4x64x64",
            lambda: ours["diffusion"](latents, t, context),
            lambda: theirs["unet"](latents, t, encoder_hidden_states=context),
        ),
        (
            "VAE decode 64x64 -> 512x512",
            lambda: ours["decoder"](small_latents),
            lambda: theirs["vae"].decode(small_latents),
        ),
        ("VAE encode 512x512", lambda: ours["encoder"](images), lambda: theirs["vae"].encode(images)),
        ("CLIP encode, batch 2, 77 tokens", lambda: ours["clip"](tokens), lambda: theirs["clip"](tokens)),
    ]
    rows = []
    for name, our_fn, their_fn in cases:
        a, b = timed(our_fn), timed(their_fn)
        extra = f"{gflop / a:.0f} vs {gflop / b:.0f} GFLOP/s (peak {peak:.0f})" if name.startswith("UNet") else ""
        rows.append([name, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}", extra])
    return rows


def generation_worker(kind: str, path: Path, steps: int, repeats: int) -> dict:
    """Loads the checkpoint, generates once to warm up, then `repeats` timed 512x512 generations."""
    if kind == "ours":
        from sd.model_loader import load_models
        from sd.pipeline import generate

        models = load_models(path)

        def run(n):
            return generate(PROMPT, models, sampler="euler_a", steps=n, seed=1, progress=False)

    else:
        from load import diffusers_pipeline

        pipe = diffusers_pipeline(path)

        def run(n):
            return pipe(PROMPT, num_inference_steps=n, generator=torch.Generator().manual_seed(1)).images

    run(2)  # the warm-up: a short generation
    return {"seconds": median_seconds(lambda: run(steps), repeats, warmup=0), "peak_rss_gb": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/sd-bench"), help="where bench/load.py keeps its files"
    )
    parser.add_argument("--skip-e2e", action="store_true", help="only the network rows")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(generation_worker(args.worker[0], Path(args.worker[1]), args.steps, args.repeats)))
        return

    devices = [(torch.device("cpu"), torch.float32)] + (
        [(torch.device("cuda"), torch.float16)] if torch.cuda.is_available() else []
    )
    gflop = unet_gflop()
    rows = []
    for device, dtype in devices:
        peak = matmul_peak_gflops(device, dtype)
        for row in networks_rows(device, dtype, args.repeats, gflop, peak):
            rows.append([f"{device.type} {str(dtype).removeprefix('torch.')}", *row])
    if not args.skip_e2e:
        from load import make_files

        path = make_files(args.workdir)[0]
        results = {}
        for kind in ("ours", "diffusers"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    kind,
                    str(path),
                    "--steps",
                    str(args.steps),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = results["ours"], results["diffusers"]
        rows.append(
            [
                "cpu float32",
                f"txt2img 512x512, {args.steps} steps (load excluded)",
                f"{a['seconds']:.1f}",
                f"{b['seconds']:.1f}",
                f"{a['seconds'] / b['seconds']:.2f}",
                "",
            ]
        )
        rows.append(
            [
                "cpu float32",
                "peak RSS of a whole generation (GiB)",
                f"{a['peak_rss_gb']:.2f}",
                f"{b['peak_rss_gb']:.2f}",
                f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}",
                "",
            ]
        )
    write_table(
        "speed",
        "Full SD v1.5 networks: ours vs diffusers (seconds, median)",
        ["device", "what", "ours", "diffusers", "ours/diffusers", "UNet throughput"],
        rows,
        [
            f"UNet: {gflop:.0f} GFLOP per step (batch 2, 64x64 latents; torch.utils.flop_counter).",
            "Peak: what a 4096x4096 matmul achieves.",
            f"Median of {args.repeats} timed runs after one warm-up (rows under a second: as many runs as fill 2 s); "
            f"threads: {torch.get_num_threads()} for both sides.",
        ],
    )


if __name__ == "__main__":
    main()
