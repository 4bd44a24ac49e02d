"""LoRA on the full SD v1.5 networks: applying and removing one (merged), and what runtime mode costs per UNet step,
ours against diffusers (load_lora_weights + fuse_lora / unfuse_lora + unload_lora_weights) in the same run.

    python bench/lora.py [--rank 16] [--repeats 3]

Seeded random weights in the public single-file layout, a random kohya LoRA of `--rank` on every attention,
feed-forward, projection, ResNet and time layer of the UNet and every CLIP attention and MLP layer; fp32 on the CPU.
The per-step rows are one UNet forward, batch 2 (as with guidance), 4x64x64 latents.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "data")]

from common import median_seconds, write_table  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from reference import diffusers_pipelines, our_models, public_key_shapes, random_checkpoint
    from safetensors.torch import save_file
    from test_lora import kohya_lora

    from sd.autoencoder import VAEConfig
    from sd.clip import CLIPConfig
    from sd.diffusion import UNetConfig
    from sd.lora import load_lora

    configs = CLIPConfig(), VAEConfig(), UNetConfig()
    checkpoint = random_checkpoint(public_key_shapes(), seed=0)
    models = our_models({k: v.clone() for k, v in checkpoint.items()}, *configs)
    folder = Path(tempfile.mkdtemp())
    state = kohya_lora(models, args.rank, True, seed=0)
    save_file(state, folder / "lora.safetensors")
    pipeline, _ = diffusers_pipelines(checkpoint, *configs, folder / "diffusers")
    gen = torch.Generator().manual_seed(0)
    latents, context, t = torch.randn(2, 4, 64, 64, generator=gen), torch.randn(2, 77, 768, generator=gen), 500

    rows = []
    with torch.no_grad():
        ours_apply, ours_remove = [], []
        for _ in range(args.repeats):  # one LoRA at a time: each merged one keeps a copy of the weights it changes
            start = time.perf_counter()
            lora = load_lora(models, folder / "lora.safetensors")
            ours_apply.append(time.perf_counter() - start)
            ours_remove.append(timed(lora.remove))
        theirs_apply = [timed(lambda: (pipeline.load_lora_weights(dict(state)), pipeline.fuse_lora()))]
        theirs_remove = [timed(lambda: (pipeline.unfuse_lora(), pipeline.unload_lora_weights()))]
        for what, ours, theirs in (
            ("apply a LoRA (merged)", ours_apply, theirs_apply),
            ("remove it", ours_remove, theirs_remove),
        ):
            mine = statistics.median(ours)
            rows.append([what, f"{mine:.2f}", f"{theirs[0]:.2f}", f"{mine / theirs[0]:.2f}"])

        plain = median_seconds(lambda: models.diffusion(latents, t, context), args.repeats)
        runtime = load_lora(models, folder / "lora.safetensors", mode="runtime")
        with_hooks = median_seconds(lambda: models.diffusion(latents, t, context), args.repeats)
        runtime.remove()
        rows.append(["UNet step, merged (= plain)", f"{plain:.2f}", "", ""])
        rows.append(["UNet step, runtime mode", f"{with_hooks:.2f}", "", f"{with_hooks / plain:.2f} of merged"])
    write_table(
        "lora",
        f"LoRA on full SD v1.5, rank {args.rank}: ours against diffusers + PEFT (seconds)",
        ["what", "ours", "diffusers", "ratio"],
        rows,
        [
            f"{len(state) // 3} layers; diffusers' apply is load_lora_weights + fuse_lora, its removal unfuse_lora + "
            f"unload_lora_weights (one run each: the second load on one pipeline is not the same work); ours: median "
            f"of {args.repeats}. CPU fp32, {torch.get_num_threads()} threads.",
        ],
    )


if __name__ == "__main__":
    main()
