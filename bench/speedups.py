"""Fewer FLOPs per image: DeepCache, token merging and LCM's few steps on full SD v1.5, ours against diffusers with
the reference implementations (DeepCache's DeepCacheSDHelper, tomesd) in the same run on the same machine.

    python bench/speedups.py [--steps 20] [--size 512] [--repeats 1]

Seeded random weights in the public v1.5 single-file layout (bench/load.py's file), fp32 on the CPU, a whole
text-to-image generation (Euler a, `--steps` steps, guidance on) per row; each side in its own process, one warm-up,
then the median of `--repeats`. "vs plain": the mean absolute pixel difference (0-255) to the same side's plain image
of the same seed, which random weights make noise-like, so it measures how far each trick moves the numbers, not how
an image looks (bench/shapes.py --speedups judges that on the built-in model). LCM: its sampler at 4 steps against
the plain run (it needs an LCM model or LoRA to make pictures; here it times 4 steps against `--steps`).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from common import median_seconds, write_table  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
OPTIONS = {  # label: generate()'s options beyond Euler a at --steps; the references are set from the same
    "plain": {},
    "DeepCache N=3": {"deepcache": (3, 0)},
    "ToMe 0.5": {"tome": 0.5},
    "DeepCache N=3 + ToMe 0.5": {"deepcache": (3, 0), "tome": 0.5},
    "LCM, 4 steps": {"sampler": "lcm", "steps": 4},
}


def worker(kind: str, path: Path, steps: int, size: int, repeats: int) -> dict:
    if kind == "ours":
        from sd.model_loader import load_models
        from sd.pipeline import generate

        models = load_models(path)

        def run(label: str, n: int):
            options = {"sampler": "euler_a", "steps": n, **OPTIONS[label]}
            return generate(PROMPT, models, seed=1, width=size, height=size, progress=False, **options).images[0]

    else:
        from load import diffusers_pipeline
        from reference import diffusers_scheduler, speedup_references

        pipe = diffusers_pipeline(path)

        def run(label: str, n: int):
            options = {"sampler": "euler_a", "steps": n, "deepcache": None, "tome": 0.0, **OPTIONS[label]}
            pipe.scheduler = diffusers_scheduler(options["sampler"])
            with speedup_references(pipe, options["deepcache"], options["tome"]):
                generator = torch.Generator().manual_seed(1)
                n = options["steps"]
                return pipe(PROMPT, num_inference_steps=n, height=size, width=size, generator=generator).images[0]

    run("plain", 2)  # the warm-up
    out, plain = {}, None
    for label in OPTIONS:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            image = np.asarray(run(label, steps), dtype=np.float32)
            times.append(time.perf_counter() - start)
        plain = image if plain is None else plain
        out[label] = {"seconds": statistics.median(times), "difference": float(np.abs(image - plain).mean())}
    return out


def unet_step_rows(repeats: int) -> list[list[str]]:
    """One UNet call (batch 2, 64x64 latents), median of `repeats`: the plain call, with ToMe 0.5, and DeepCache's
    call between full passes (branch 0), ours and diffusers': per-step numbers with less noise than whole images."""
    import tomesd
    from DeepCache import DeepCacheSDHelper
    from reference import our_models, public_key_shapes, random_checkpoint, reference_unet

    from sd.autoencoder import VAEConfig
    from sd.clip import CLIPConfig
    from sd.deepcache import DeepCache
    from sd.diffusion import UNetConfig
    from sd.sampling import CURRENT_STEP
    from sd.tome import token_merging

    configs = CLIPConfig(), VAEConfig(), UNetConfig()
    checkpoint = random_checkpoint(public_key_shapes(), seed=0)
    models = our_models({k: v.clone() for k, v in checkpoint.items()}, *configs)
    theirs = reference_unet(checkpoint, configs[1], configs[2])
    del checkpoint
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 64, 64, generator=gen), torch.randn(2, 77, 768, generator=gen)
    ours = lambda: models.diffusion(x, 500, context)  # noqa: E731
    reference = lambda: theirs(x, 500, context)  # noqa: E731
    rows = []
    with torch.inference_mode():
        plain, plain_theirs = median_seconds(ours, repeats), median_seconds(reference, repeats)
        with token_merging(models.diffusion, 0.5):
            merged = median_seconds(ours, repeats)
        tomesd.apply_patch(theirs, ratio=0.5, use_rand=False)
        merged_theirs = median_seconds(reference, repeats)
        tomesd.remove_patch(theirs)
        cache = DeepCache(models.diffusion, 3)
        cache(x, 500, context)  # the full pass (outside a generation every call is one)
        token = CURRENT_STEP.set((1, 500.0))
        try:
            shallow = median_seconds(lambda: cache(x, 500, context), repeats)
        finally:
            CURRENT_STEP.reset(token)
        pipe = type("Pipe", (), {"unet": theirs, "scheduler": type("S", (), {"timesteps": [500, 499]})()})()
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        theirs(x, torch.tensor(500), context)  # its full pass at timestep index 0
        shallow_theirs = median_seconds(lambda: theirs(x, torch.tensor(499), context), repeats)
        helper.disable()
    for label, a, b in (
        ("UNet step (batch 2, 64x64 latents)", plain, plain_theirs),
        ("UNet step, ToMe 0.5", merged, merged_theirs),
        ("UNet step between DeepCache's full passes", shallow, shallow_theirs),
    ):
        rows.append([label, f"{a:.2f}", f"{plain / a:.2f}x", "", f"{b:.2f}", f"{plain_theirs / b:.2f}x", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd-bench"), help="bench/load.py's files")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker[0], Path(args.worker[1]), args.steps, args.size, args.repeats)
        print(json.dumps(result))
        return
    from load import make_files

    path = make_files(args.workdir)[0]
    rows = unet_step_rows(args.repeats + 2)
    results = {}
    for kind in ("ours", "diffusers"):
        command = [sys.executable, __file__, "--worker", kind, str(path), "--steps", str(args.steps)]
        command += ["--size", str(args.size), "--repeats", str(args.repeats)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, theirs = results["ours"], results["diffusers"]
    for label in OPTIONS:
        a, b = ours[label], theirs[label]
        rows.append(
            [
                label,
                f"{a['seconds']:.1f}",
                f"{ours['plain']['seconds'] / a['seconds']:.2f}x",
                f"{a['difference']:.1f}",
                f"{b['seconds']:.1f}",
                f"{theirs['plain']['seconds'] / b['seconds']:.2f}x",
                f"{b['difference']:.1f}",
            ]
        )
    write_table(
        "speedups",
        f"Full SD v1.5, {args.size}x{args.size}, {args.steps} Euler a steps, CPU fp32: the speed-ups, ours and the "
        "references on diffusers",
        ["option", "ours (s)", "speed-up", "vs plain", "diffusers (s)", "speed-up", "vs plain"],
        rows,
        [
            "diffusers' rows: DeepCacheSDHelper (cache_interval 3, cache_branch_id 0) and tomesd.apply_patch(ratio 0.5,"
            " use_rand=False) on its StableDiffusionPipeline; LCM: its LCMScheduler. "
            f"Threads: {torch.get_num_threads()}; {args.repeats} timed run(s) after a warm-up.",
        ],
    )


if __name__ == "__main__":
    main()
