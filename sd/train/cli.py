"""`python -m sd.train ...`: the command line that builds the models and data and runs the stages."""

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.files import save_atomically
from sd.model_converter import from_native, to_native
from sd.model_loader import DEFAULT_CHECKPOINT, load_models
from sd.models import Models, networks
from sd.native import native_metadata
from sd.shapes import SHAPES, UNSEEN_SHAPES
from sd.tokenizer import default_tokenizer
from sd.train.data import FolderData, InpaintingShapes, ShapesData
from sd.train.lora import TARGETS
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


def widen_for_inpainting(models: Models) -> None:
    """The UNet made an inpainting one (9 input channels: latents, mask, masked image's latents), computing what it
    computed: the new channels' conv_in weights start at zero (as SD v1.5 inpainting was started from SD v1.2)."""
    unet = models.diffusion
    if unet.cfg.in_channels != models.encoder.cfg.latent_channels:
        return
    old = unet.input_blocks[0][0]
    extra = 1 + models.encoder.cfg.latent_channels
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, padding=old.padding).to(old.weight)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.input_blocks[0][0] = new
    unet.cfg = dataclasses.replace(unet.cfg, in_channels=new.in_channels)


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
    p.add_argument(
        "--run-dir",
        "--run",
        dest="run",
        type=Path,
        required=True,
        help="folder for checkpoints and loss.log (under torchrun spell it --run-dir: torchrun reads --run as its "
        "own --run-path)",
    )
    p.add_argument(
        "--init",
        type=Path,
        help="start from this checkpoint (fine-tuning); default: from scratch, or the built-in model for a LoRA",
    )
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
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default: 1e-3 (vae), 3e-4 from scratch, 1e-5 fine-tuning, 1e-4 a LoRA (kohya's default)",
    )
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
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=SHAPES + UNSEEN_SHAPES,
        default=SHAPES,
        help=f"shapes data: the shapes drawn (default: the built-in model's {', '.join(SHAPES)}; "
        f"{', '.join(UNSEEN_SHAPES)}: ones it never saw, for a LoRA to teach it)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="train a LoRA of rank R on the frozen model (--init, default the built-in model) instead of its "
        "weights; --export writes it as a kohya-format LoRA file",
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's alpha: scale alpha / rank (default: R)")
    p.add_argument(
        "--lora-targets",
        choices=list(TARGETS),
        default="attn",
        help="the UNet layers that get adapters: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()),
    )
    p.add_argument(
        "--inpainting",
        action="store_true",
        help="fine-tune --init into an inpainting model (9-channel UNet: the mask and the masked image's latents as "
        "extra inputs, their weights starting at zero) on the shapes world with masks (sd.shapes.inpainting_sample)",
    )
    p.add_argument("--image-size", type=int, default=512, help="folder data: the square side (default 512)")
    p.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="when fine-tuning (always from scratch); with --lora-rank, adapters on the text encoder too",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    p.add_argument(
        "--export", type=Path, help="write the trained model (native .safetensors, fp16) or LoRA (kohya, fp16) here"
    )
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
    args = p.parse_args(argv)
    if args.lora_rank:
        if args.stage not in (None, "diffusion"):
            p.error("--lora-rank trains the diffusion stage only")
        if args.lora_rank < 0:
            p.error(f"--lora-rank must be a positive whole number; got {args.lora_rank}")
    if args.inpainting:
        if args.data != "shapes" or args.recolour or args.latent_pool or args.lora_rank or args.stage == "vae":
            p.error("--inpainting fine-tunes the UNet on --data shapes; without --recolour, --latent-pool, --lora-rank")
    if args.lora_rank or args.inpainting:  # both change a trained model: by default the built-in one
        args.init = args.init or DEFAULT_CHECKPOINT
    return args


def device_and_rank(choice: str) -> tuple[torch.device, int]:
    """The device, and this process's rank: under torchrun (WORLD_SIZE > 1) the process group is started, gloo on
    CPUs, nccl on GPUs, one GPU per process."""
    cuda = torch.cuda.is_available() if choice == "auto" else choice == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device("cuda" if cuda else "cpu"), 0
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu"), dist.get_rank()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, rank = device_and_rank(args.device)
    try:
        return run(args, argv, device, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace, argv: list[str] | None, device: torch.device, rank: int) -> int:
    fine_tuning = args.init is not None
    if args.stage == "all" or (args.stage is None and not fine_tuning):
        stages = ["vae", "diffusion"]
    else:
        stages = [args.stage or "diffusion"]
    if args.recolour and args.data != "shapes":
        raise ValueError("--recolour needs --data shapes: a folder of images has no re-coloured copies")
    if args.inpainting:
        data = InpaintingShapes()
    elif args.data == "shapes":
        data = ShapesData(args.recolour, tuple(args.shapes))
    else:
        data = FolderData(Path(args.data), args.image_size)
    configs = SHAPES_CONFIGS if args.configs == "shapes" else TINY_CONFIGS
    models = load_models(args.init, device=device) if fine_tuning else fresh_models(configs, device)
    models.image_size = data.image_size
    if args.inpainting:
        widen_for_inpainting(models)
    args.run.mkdir(parents=True, exist_ok=True)
    command = "python -m sd.train " + " ".join(sys.argv[1:] if argv is None else argv)
    if fine_tuning and models.command and not args.lora_rank:
        command = f"{models.command} && {command}"  # the file's history: the commands that made it, then this one
    say = print if rank == 0 else lambda *_: None
    # one process writes the log; the others' losses are the same numbers (Trainer.batch_mean)
    with open(args.run / "loss.log", "a") if rank == 0 else open(os.devnull, "w") as log:
        for stage in stages:
            if stage == "diffusion" and not fine_tuning:
                if dist.is_initialized():
                    dist.barrier()  # the first process has written the autoencoder
                restore_vae(models, args.run, device)
            default_lr = 1e-3 if stage == "vae" else 1e-4 if args.lora_rank else 1e-5 if fine_tuning else 3e-4
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
                lora_rank=args.lora_rank,
                lora_alpha=args.lora_alpha,
                lora_targets=args.lora_targets,
                inpainting=args.inpainting,
            )
            # the autoencoder never sees re-coloured sources: stage 1 is the same whatever --recolour is
            stage_data = ShapesData(shapes=tuple(args.shapes)) if stage == "vae" and args.data == "shapes" else data
            trainer = Trainer(models, settings, stage_data, args.run, device)
            if args.resume and (args.run / f"{stage}.pt").exists():
                trainer.resume()
                say(f"resuming {stage} at step {trainer.step}")
            trainer.train(log)
            trainer.use_ema()
            if stage == "vae":
                factor = normalise_latents(models, stage_data, np.random.default_rng(args.seed))
                say(f"latents rescaled by {factor:.4f} to SD v1's scale")
                if rank == 0:
                    export(models, args.run / "vae.safetensors", command, dtype=torch.float32)
    if args.export and rank == 0:
        if trainer.adapters is not None:
            args.export.parent.mkdir(parents=True, exist_ok=True)
            trainer.adapters.save(args.export, command)
        else:
            export(models, args.export, command)
        say(f"wrote {args.export}")
    return 0


def restore_vae(models: Models, run: Path, device: torch.device) -> None:
    """Stage 1's normalised autoencoder, from the run folder (written there when stage 1 finished)."""
    if not (run / "vae.safetensors").is_file():
        raise ValueError(f"{run}: no trained autoencoder (vae.safetensors); run stage vae first")
    components = from_native(load_file(run / "vae.safetensors", device=str(device)))
    models.encoder.load_state_dict(components["encoder"])
    models.decoder.load_state_dict(components["decoder"])
