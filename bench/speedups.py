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

from common import write_table  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
OPTIONS = {  # label: (our generate() options, the reference's: DeepCache (interval, branch), tomesd ratio, sampler)
    "plain": ({}, (None, 0.0, "euler_a")),
    "DeepCache N=3": ({"deepcache": 3}, ((3, 0), 0.0, "euler_a")),
    "ToMe 0.5": ({"tome": 0.5}, (None, 0.5, "euler_a")),
    "DeepCache N=3 + ToMe 0.5": ({"deepcache": 3, "tome": 0.5}, ((3, 0), 0.5, "euler_a")),
    "LCM, 4 steps": ({"sampler": "lcm", "steps": 4}, (None, 0.0, "lcm")),
}


def worker(kind: str, path: Path, steps: int, size: int, repeats: int) -> dict:
    if kind == "ours":
        from sd.model_loader import load_models
        from sd.pipeline import generate

        models = load_models(path)

        def run(label: str, n: int):
            options = {"sampler": "euler_a", "steps": n, **OPTIONS[label][0]}
            return generate(PROMPT, models, seed=1, width=size, height=size, progress=False, **options).images[0]

    else:
        import tomesd
        from DeepCache import DeepCacheSDHelper
        from diffusers import StableDiffusionPipeline
        from load import diffusers_loader
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

        def run(label: str, n: int):
            deepcache, ratio, sampler = OPTIONS[label][1]
            pipe.scheduler = diffusers_scheduler(sampler)
            n = OPTIONS[label][0].get("steps", n)
            helper = DeepCacheSDHelper(pipe=pipe)
            if deepcache:
                helper.set_params(cache_interval=deepcache[0], cache_branch_id=deepcache[1])
                helper.enable()
            if ratio:
                tomesd.apply_patch(pipe, ratio=ratio, use_rand=False)
            try:
                generator = torch.Generator().manual_seed(1)
                return pipe(PROMPT, num_inference_steps=n, height=size, width=size, generator=generator).images[0]
            finally:
                tomesd.remove_patch(pipe)
                if deepcache:
                    helper.disable()

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
    results = {}
    for kind in ("ours", "diffusers"):
        command = [sys.executable, __file__, "--worker", kind, str(path), "--steps", str(args.steps)]
        command += ["--size", str(args.size), "--repeats", str(args.repeats)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, theirs = results["ours"], results["diffusers"]
    rows = []
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
