"""Training and fine-tuning latent diffusion: `python -m sd.train ...` (`--help` lists the options).

Stage 1, `vae`: the autoencoder, on L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)). Afterwards its latents
are rescaled (inside its first and last 1x1 convolutions) to SD v1's convention: standard deviation 1 / 0.18215,
so the pipeline's one scaling factor fits every model.
Stage 2, `diffusion`: the UNet (and, trained from scratch, the text encoder) on the frozen autoencoder's latents,
minimising ||eps - eps_theta(z_t, t, c)||^2 with z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps, t uniform over SD v1's 1000
training steps, and 10% of captions replaced by "" so that classifier-free guidance works; `--min-snr-gamma 5`
weights each sample's error by min(SNR, 5) / SNR instead (Min-SNR-gamma, Hang et al. 2023). On the shapes data,
`--recolour 0.3` noises that fraction of samples from a copy with the shape in another colour and asks for the
caption's image back (see Trainer.edited): the edit image-to-image re-colouring makes, which plain training never shows.
`--latent-pool N` encodes N samples once and draws the diffusion batches from their posteriors (see LatentPool).
docs/training.md has the measurements behind the defaults and the built-in model's training log.

Both: AdamW, gradient clipping, EMA weights (what gets exported), a fixed seed, a checkpoint every `--save-every`
steps that `--resume` continues from exactly, a tqdm bar with the loss, a loss log (`loss.log` in the run folder),
mixed precision (bf16, or fp16 on older GPUs) and gradient checkpointing on request.

    python -m sd.train --data shapes --run runs/shapes --export weights/shapes.safetensors     # the built-in model
    python -m sd.train --data my_images/ --init sd15.safetensors --run runs/mine --steps 2000 --export mine.safetensors

A data folder holds images with captions beside them (`cat.png` + `cat.txt`).

`--lora-rank R` trains LoRA adapters on the frozen model instead of its weights (lora.py) and exports a kohya-format
LoRA file. Under `torchrun --nproc_per_node N -m sd.train ... --run-dir RUN` the same loop runs in N processes with
DistributedDataParallel, `--batch-size` being the global batch (see trainer.py).

Modules: data.py (shapes, folders, the latent pool), losses.py, ema.py, lora.py (adapters, kohya export),
trainer.py (the loop, checkpoints, processes), cli.py.
"""

from sd.train.cli import SHAPES_CONFIGS, TINY_CONFIGS, fresh_models, main
from sd.train.data import FolderData, LatentPool, ShapesData
from sd.train.ema import EMA
from sd.train.trainer import Settings, Trainer, normalise_latents

__all__ = [
    "EMA",
    "SHAPES_CONFIGS",
    "TINY_CONFIGS",
    "FolderData",
    "LatentPool",
    "Settings",
    "ShapesData",
    "Trainer",
    "fresh_models",
    "main",
    "normalise_latents",
]
