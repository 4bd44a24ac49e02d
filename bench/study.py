"""What the study tools cost: word heat maps and every step's images against plain generation, and the attention
hooks on one full-size UNet step against diffusers with a DAAM-style recording processor, in the same run.

    python bench/study.py [--repeats 3]

Built-in model: one 64x64 image, 20 Euler a steps. Full size: SD v1.5's UNet with seeded random weights, one
forward at batch 2 (as with guidance), 4x64x64 latents, fp32 on the CPU; the hooks read the probabilities of the
cross-attention layers (what a heat map needs) or of every attention layer. The diffusers column records the same
probabilities with a processor that computes them explicitly (as DAAM's does) and attends with them.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from common import median_seconds, write_table  # noqa: E402

from sd import study  # noqa: E402
from sd.model_loader import load_models  # noqa: E402
from sd.pipeline import generate  # noqa: E402

PROMPT = "a red circle on a blue background"


def builtin_rows(repeats: int) -> list[list[str]]:
    models = load_models(None)
    options = dict(seed=0, steps=20, progress=False)
    plain = median_seconds(lambda: generate(PROMPT, models, **options), repeats)
    maps = median_seconds(lambda: study.attention_maps(PROMPT, models, **options), repeats)
    steps = median_seconds(lambda: study.trajectory(PROMPT, models, **options), repeats)
    return [
        ["built-in, 20 steps", "plain generation", f"{plain:.3f}", "", "1.00"],
        [
            "built-in, 20 steps",
            "attention_maps (every cross-attention layer)",
            f"{maps:.3f}",
            "",
            f"{maps / plain:.2f}",
        ],
        ["built-in, 20 steps", "trajectory (40 decodes)", f"{steps:.3f}", "", f"{steps / plain:.2f}"],
    ]


class DAAMStyle:
    """diffusers' attention with explicit probabilities, kept (DAAM's processor, reduced to what it computes)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor

        self.plain = AttnProcessor()
        self.kept = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k = attn.head_to_batch_dim(attn.to_q(hidden_states)), attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(q, k, None)
        v = attn.head_to_batch_dim(attn.to_v(context))
        self.kept += probs.shape[0]
        return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v)))


def full_size_rows(repeats: int) -> list[list[str]]:
    from reference import our_models, public_key_shapes, random_checkpoint, reference_unet

    from sd.autoencoder import VAEConfig
    from sd.clip import CLIPConfig
    from sd.diffusion import UNetConfig

    configs = CLIPConfig(), VAEConfig(), UNetConfig()
    checkpoint = random_checkpoint(public_key_shapes(), seed=0)
    models = our_models({k: v.clone() for k, v in checkpoint.items()}, *configs)
    theirs = reference_unet(checkpoint, configs[1], configs[2])
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 64, 64, generator=gen), torch.randn(2, 77, 768, generator=gen)
    ours = lambda: models.diffusion(latents, 500, context)  # noqa: E731
    reference = lambda: theirs(latents, 500, context)  # noqa: E731
    keep = lambda name, step, t, probs, grid: None  # noqa: E731
    rows = []
    with torch.no_grad():
        plain, plain_theirs = median_seconds(ours, repeats), median_seconds(reference, repeats)
        rows.append(["SD v1.5 UNet step", "no hook", f"{plain:.2f}", f"{plain_theirs:.2f}", "1.00"])
        for what, cross_only in (("cross-attention", True), ("every attention layer", False)):
            picked = lambda name, cross_only=cross_only: not cross_only or name.endswith("attn2")  # noqa: E731
            with study.hook_attention(models, keep, [n for n in study.attention_layers(models) if picked(n)]):
                hooked = median_seconds(ours, repeats)
            processors = dict(theirs.attn_processors)  # names end in ".attn1.processor" / ".attn2.processor"
            theirs.set_attn_processor(
                {n: DAAMStyle() if picked(n[: -len(".processor")]) else p for n, p in processors.items()}
            )
            hooked_theirs = median_seconds(reference, repeats)
            theirs.set_attn_processor(processors)
            ratio = f"{hooked / plain:.2f}"
            rows.append(
                ["SD v1.5 UNet step", f"probabilities of {what}", f"{hooked:.2f}", f"{hooked_theirs:.2f}", ratio]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = builtin_rows(args.repeats) + full_size_rows(args.repeats)
    write_table(
        "study",
        "The study tools' cost (seconds; ratio: to the same work without the tool)",
        ["model", "what", "ours", "diffusers", "ratio"],
        rows,
        [
            f"Median of {args.repeats} runs after a warm-up, CPU fp32, {torch.get_num_threads()} threads. The "
            "diffusers column: its UNet with a processor that computes the probabilities explicitly (as DAAM's) in "
            "the same layers; without hooks both attend through PyTorch's scaled_dot_product_attention.",
        ],
    )


if __name__ == "__main__":
    main()
