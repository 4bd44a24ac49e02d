"""Prompt encoding with the full SD v1.5 text encoder: ours on a plain 77-token prompt and on long (3-chunk) and
weighted prompts, against diffusers' StableDiffusionPipeline.encode_prompt on the plain prompt.

    python bench/prompts.py [--repeats 20]

Seeded random CLIP ViT-L/14 weights in the public single-file layout, the same tensors for both sides, fp32 on the
CPU, batch 1, no classifier-free guidance (one prompt); median of `--repeats` after a warm-up. A chunk is one CLIP
pass, so a 3-chunk prompt should cost about three plain ones.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "data")]

from common import median_seconds, write_table  # noqa: E402

PLAIN = "a photo of an astronaut riding a horse on mars, highly detailed, sharp focus, 8k, trending on artstation"
LONG = ", ".join([PLAIN] * 8)  # 3 chunks of 75 tokens
WEIGHTED = LONG.replace("astronaut", "(astronaut:1.3)").replace("horse", "[horse]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from reference import diffusers_tokenizer, ldm_key_shapes, our_models, random_checkpoint, reference_clip

    from sd.autoencoder import VAEConfig
    from sd.clip import CLIPConfig
    from sd.diffusion import UNetConfig
    from sd.prompts import chunks, encode_prompt

    configs = CLIPConfig(), VAEConfig.tiny(), UNetConfig.tiny()
    checkpoint = random_checkpoint(ldm_key_shapes(*configs), seed=0)
    models = our_models(checkpoint, *configs)
    with tempfile.TemporaryDirectory() as folder:
        pipeline = StableDiffusionPipeline(
            vae=None,
            text_encoder=reference_clip(checkpoint, configs[0], Path(folder)),
            tokenizer=diffusers_tokenizer(Path(folder) / "tokenizer"),
            unet=None,
            scheduler=EulerAncestralDiscreteScheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def ours(prompt: str):
        return lambda: encode_prompt(models, prompt)

    def theirs(prompt: str):
        return lambda: pipeline.encode_prompt(prompt, "cpu", 1, False)

    cases = (
        ("diffusers encode_prompt, plain prompt", PLAIN, theirs(PLAIN)),
        ("ours, plain prompt", PLAIN, ours(PLAIN)),
        ("ours, long prompt", LONG, ours(LONG)),
        ("ours, long prompt with emphasis", WEIGHTED, ours(WEIGHTED)),
    )
    with torch.no_grad():
        measured = [(what, len(chunks(models, prompt)), median_seconds(fn, args.repeats)) for what, prompt, fn in cases]
    baseline = measured[0][2]
    rows = [[what, n, f"{s * 1000:.1f}", f"{s / baseline:.2f}", f"{s / n * 1000:.1f}"] for what, n, s in measured]
    write_table(
        "prompts",
        "Prompt encoding, full SD v1.5 text encoder: ours against diffusers' encode_prompt (ms, median)",
        ["what", "chunks", "ms", "/ diffusers plain", "ms per chunk"],
        rows,
        [f"Median of {args.repeats} runs after a warm-up; fp32, CPU, {torch.get_num_threads()} threads."],
    )


if __name__ == "__main__":
    main()
