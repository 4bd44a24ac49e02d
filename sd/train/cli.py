"""`python -m sd.train ...`: the command line that builds the models and data and runs the stages."""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.files import save_atomically
from sd.model_converter import from_native, to_native
from sd.model_loader import load_models
from sd.models import Models, networks
from sd.native import native_metadata
from sd.tokenizer import default_tokenizer
from sd.train.data import FolderData, ShapesData
from sd.train.trainer import Settings, Trainer, normalise_latents

# The built-in model: every kind of SD v1 block, small enough to train on two CPU cores in an hour. Its VAE
# downsamples 4x, not 8x: 64x64 images need 16x16 latents to keep a star a star. Its heads follow SD v1's conventions
# (8 in the UNet, 64-wide in CLIP), so its single-file export loads like any SD v1 file.
SHAPES_CONFIGS = {
    "clip": CLIPConfig(width=128, layers=3, heads=2, mlp_width=512),
    "vae": VAEConfig(channels=32, channel_mult=(1, 1, 2), num_res_blocks=1),  # 4x: 16x16x4 latents
    "diffusion": UNetConfig(
        channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(False, True, True), context_dim=128
    ),
}


TINY_CONFIGS = {"clip": CLIPConfig.tiny(), "vae": VAEConfig.tiny(), "diffusion": UNetConfig.tiny()}


def fresh_models(configs: dict, device: torch.device) -> Models:
    """Newly initialised networks for `configs` (seeded: the same every run), with the CLIP tokenizer."""
    torch.manual_seed(0)
    with torch.device(device):
        nets = networks(configs)
    return Models(default_tokenizer(), **nets, source="from scratch", format="fresh")


def export(models: Models, path: Path, command: str, dtype: torch.dtype = torch.float16) -> None:
    """The native file (configs, image size and the training command in its metadata), written atomically."""
    state = to_native(
        {n: {k: v.to(dtype).contiguous() for k, v in net.state_dict().items()} for n, net in models.named().items()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(state, path, native_metadata(models, dtype=str(dtype).removeprefix("torch."), command=command))


def number_in(low: float, high: float = math.inf):
    """An argparse type: a number in [low, high]."""
    bounds = f"in [{low:g}, {high:g}]" if high < math.inf else f"at least {low:g}"

    def number(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {bounds}; got {text}")
        return value

    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sd.train", description="Training and fine-tuning latent diffusion.")
    p.add_argument("--data", required=True, help='"shapes" (synthetic) or a folder of images with .txt captions')
    p.add_argument("--run", type=Path, required=True, help="folder for checkpoints and loss.log")
    p.add_argument("--init", type=Path, help="start from this checkpoint (fine-tuning); default: from scratch")
    p.add_argument(
        "--configs",
        choices=["shapes", "tiny"],
        default="shapes",
        help="networks from scratch: the built-in model's, or tiny (tests)",
    )
    p.add_argument(
        "--stage",
        choices=["all", "vae", "diffusion"],
        default=None,
        help="default: all from scratch, diffusion when fine-tuning",
    )
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12000, help="diffusion steps")
    p.add_argument("--batch-size", type=int, default=32, help="diffusion batch size")
    p.add_argument(
        "--min-snr-gamma",
        type=float,
        default=None,
        help="Min-SNR-gamma loss weighting, e.g. 5: converges in fewer steps (default: off, the plain mean)",
    )
    p.add_argument(
        "--recolour",
        type=float,
        default=0.0,
        help="shapes data: the fraction of samples to noise from a re-coloured copy, so that image-to-image "
        "re-colouring keeps the shape in place (default 0)",
    )
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (vae), 3e-4 from scratch, 1e-5 fine-tuning")
    p.add_argument(
        "--caption-dropout",
        type=number_in(0, 1),
        default=Settings.caption_dropout,
        help="diffusion: the fraction of captions replaced by the empty prompt, which trains the unconditional "
        "prediction that classifier-free guidance extrapolates from (default 0.1, as SD v1)",
    )
    p.add_argument(
        "--ema-decay",
        type=number_in(0, 1),
        default=Settings.ema_decay,
        help="the decay of the exponential moving average of the weights that is exported (default 0.999); its "
        "warm-up decay (1 + n) / (10 + n) (the default --ema-warmup) is lower than 0.999 until step 8,990, so "
        "shorter runs never reach it",
    )
    p.add_argument(
        "--ema-warmup",
        type=number_in(1),
        default=Settings.ema_warmup,
        metavar="C",
        help="diffusion: the EMA's warm-up decay at step n is (1 + n) / (C + n) (default 10); a smaller C averages "
        "the weights over a longer stretch of a short run",
    )
    p.add_argument("--image-size", type=int, default=512, help="folder data: the square side (default 512)")
    p.add_argument("--train-text-encoder", action="store_true", help="when fine-tuning (always from scratch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    p.add_argument("--export", type=Path, help="write the trained model here (native .safetensors, fp16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="bf16 autocast (fp16 on GPUs without bf16); fp32 weights, faster on CPUs with AVX512-BF16 or AMX",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations: less memory")
    p.add_argument(
        "--latent-pool",
        type=int,
        default=0,
        metavar="N",
        help="encode N samples once and draw diffusion batches from them (default 0: encode every batch afresh)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    fine_tuning = args.init is not None
    if args.stage == "all" or (args.stage is None and not fine_tuning):
        stages = ["vae", "diffusion"]
    else:
        stages = [args.stage or "diffusion"]
    if args.recolour and args.data != "shapes":
        raise ValueError("--recolour needs --data shapes: a folder of images has no re-coloured copies")
    data = ShapesData(args.recolour) if args.data == "shapes" else FolderData(Path(args.data), args.image_size)
    configs = SHAPES_CONFIGS if args.configs == "shapes" else TINY_CONFIGS
    models = load_models(args.init, device=device) if fine_tuning else fresh_models(configs, device)
    models.image_size = data.image_size
    args.run.mkdir(parents=True, exist_ok=True)
    command = "python -m sd.train " + " ".join(sys.argv[1:] if argv is None else argv)
    if fine_tuning and models.command:  # the file's history: the commands that made the checkpoint, then this one
        command = f"{models.command} && {command}"
    with open(args.run / "loss.log", "a") as log:
        for stage in stages:
            if stage == "diffusion" and not fine_tuning:
                restore_vae(models, args.run, device)
            default_lr = 1e-3 if stage == "vae" else 1e-5 if fine_tuning else 3e-4
            settings = Settings(
                stage=stage,
                steps=args.vae_steps if stage == "vae" else args.steps,
                batch_size=args.vae_batch_size if stage == "vae" else args.batch_size,
                lr=args.lr or default_lr,
                min_snr_gamma=args.min_snr_gamma if stage == "diffusion" else None,
                train_text_encoder=args.train_text_encoder or not fine_tuning,
                seed=args.seed,
                save_every=args.save_every,
                mixed_precision=args.mixed_precision,
                gradient_checkpointing=args.gradient_checkpointing,
                latent_pool=args.latent_pool,
                caption_dropout=args.caption_dropout,
                ema_decay=args.ema_decay,
                ema_warmup=args.ema_warmup if stage == "diffusion" else Settings.ema_warmup,
            )
            # the autoencoder never sees re-coloured sources: stage 1 is the same whatever --recolour is
            stage_data = ShapesData() if stage == "vae" and args.data == "shapes" else data
            trainer = Trainer(models, settings, stage_data, args.run, device)
            if args.resume and (args.run / f"{stage}.pt").exists():
                trainer.resume()
                print(f"resuming {stage} at step {trainer.step}")
            trainer.train(log)
            trainer.use_ema()
            if stage == "vae":
                factor = normalise_latents(models, stage_data, np.random.default_rng(args.seed))
                print(f"latents rescaled by {factor:.4f} to SD v1's scale")
                export(models, args.run / "vae.safetensors", command, dtype=torch.float32)
    if args.export:
        export(models, args.export, command)
        print(f"wrote {args.export}")
    return 0


def restore_vae(models: Models, run: Path, device: torch.device) -> None:
    """Stage 1's normalised autoencoder, from the run folder (written there when stage 1 finished)."""
    if not (run / "vae.safetensors").is_file():
        raise ValueError(f"{run}: no trained autoencoder (vae.safetensors); run stage vae first")
    components = from_native(load_file(run / "vae.safetensors", device=str(device)))
    models.encoder.load_state_dict(components["encoder"])
    models.decoder.load_state_dict(components["decoder"])
