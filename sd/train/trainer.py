"""The training run: one stage's settings, the loop (AdamW, gradient clipping, EMA, mixed precision), its
checkpoints and exact resume, and the autoencoder's latent rescaling after stage 1.

Under torchrun the same loop runs in every process with DistributedDataParallel: every process draws the same
random choices for the whole batch (data, noise, timesteps, caption dropout, from generators seeded alike) and
computes only its share of the samples; DDP averages the shares' gradients, which is the gradient of the whole
batch's mean loss, so N processes train what one process would with the same global batch.
"""

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from sd.autoencoder import sample_posterior
from sd.models import Models
from sd.sampling import alphas_cumprod
from sd.train.data import LatentPool
from sd.train.ema import EMA
from sd.train.lora import Adapters
from sd.train.losses import autoencoder_loss, min_snr_weights


@dataclass
class Settings:
    """One stage's hyper-parameters."""

    stage: str = "diffusion"  # "vae" or "diffusion"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 200  # steps of linear learning-rate warm-up, at most a tenth of the run
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: float = 10.0  # the EMA's decay is min(ema_decay, (1 + n) / (ema_warmup + n)) at step n
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None: the plain mean
    kl_weight: float = 1e-5
    edge_weight: float = 5.0  # reconstruction errors near edges count up to 11x: flat areas dominate otherwise
    train_text_encoder: bool = False
    seed: int = 0
    save_every: int = 500
    mixed_precision: bool = False
    gradient_checkpointing: bool = False
    latent_pool: int = 0  # diffusion: samples encoded once and drawn from (LatentPool); 0: encode every batch afresh
    lora_rank: int = 0  # diffusion: train LoRA adapters of this rank on the frozen model; 0: the weights themselves
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: str = "attn"  # a key of sd.train.lora.TARGETS
    inpainting: bool = False  # a 9-channel UNet, on data whose batches carry masks (InpaintingShapes)


class Denoiser(nn.Module):
    """What a diffusion step runs, as one module (what DistributedDataParallel wraps): captions' tokens to
    context, then the UNet's noise prediction; LoRA adapters, when trained, ride along in `adapters`."""

    def __init__(self, models: Models, adapters: Adapters | None, text_grad: bool):
        super().__init__()
        self.clip, self.diffusion, self.adapters, self.text_grad = models.clip, models.diffusion, adapters, text_grad

    def forward(
        self, z_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """extra: an inpainting UNet's further input channels (the mask, the masked image's latents)."""
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            context = self.clip(tokens)
        return self.diffusion(z_t if extra is None else torch.cat([z_t, extra.to(z_t)], dim=1), t, context)


class Autoencoder(nn.Module):
    """What an autoencoder step runs, as one module: images -> posterior -> a draw (with the given noise) ->
    reconstruction; returns (reconstruction, mean, log-variance), the latter two in the images' precision."""

    def __init__(self, models: Models):
        super().__init__()
        self.encoder, self.decoder = models.encoder, models.decoder

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = (x.to(images.dtype) for x in self.encoder(images))  # the models' precision, not autocast's
        return self.decoder(sample_posterior(mean, logvar, noise.to(mean))), mean, logvar


class Trainer:
    def __init__(self, models: Models, settings: Settings, data, run: Path, device: torch.device):
        self.models, self.settings, self.data, self.run, self.device = models, settings, data, run, device
        # the models' own precision (float32; float64 in the tests that compare runs exactly), which the losses and
        # posteriors keep whatever the autocast
        self.dtype = models.dtype
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        n = settings.batch_size
        if n % self.world:
            raise ValueError(f"a batch of {n} does not split evenly over {self.world} processes")
        self.share = self.whole(n // self.world)[1]
        for net in models.named().values():
            net.requires_grad_(False).eval()
        self.adapters, s = None, settings
        if settings.stage == "vae":
            self.trained = {"encoder": models.encoder, "decoder": models.decoder}
        elif settings.lora_rank:
            self.adapters = Adapters(models, s.lora_rank, s.lora_alpha, s.lora_targets, s.train_text_encoder, s.seed)
            self.trained = {"lora": self.adapters}
        else:
            self.trained = {"diffusion": models.diffusion} | (
                {"clip": models.clip} if settings.train_text_encoder else {}
            )
        for net in self.trained.values():
            net.requires_grad_(True).train()
        if settings.stage == "vae":
            network = Autoencoder(models)
        else:
            network = Denoiser(models, self.adapters, settings.train_text_encoder)
        ids = [device.index] if device.type == "cuda" else None
        self.step_module = nn.parallel.DistributedDataParallel(network, ids) if self.world > 1 else network
        models.diffusion.gradient_checkpointing = settings.gradient_checkpointing
        params = [p for net in self.trained.values() for p in net.parameters()]
        # the fused kernel: on CPU a fraction of the per-parameter loop's time (measured in docs/training.md)
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.ema = EMA(self.trained, settings.ema_decay, settings.ema_warmup)
        self.step = 0
        self.data_rng = np.random.default_rng(settings.seed)
        self.noise_rng = torch.Generator().manual_seed(settings.seed)
        self.alphas_cumprod = alphas_cumprod().to(device)
        self.pool = None
        self.autocast = autocast_dtype(device) if settings.mixed_precision else None
        # In bf16 on CPU the flash attention kernel's backward is slower than the math kernel's with small heads. The
        # math kernel holds whole attention matrices, too many at SD's 4096 tokens: only for small latents.
        small = (data.image_size // models.encoder.cfg.pixels_per_latent) ** 2 <= 1024
        self.math_attention = device.type == "cpu" and self.autocast is not None and small
        # only fp16 needs its gradients scaled: bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then a cosine decay to a tenth of the learning rate at the last step."""
        progress = min(step / max(self.settings.steps, 1), 1.0)
        warmup = max(1, min(self.settings.warmup, self.settings.steps // 10))
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    # checkpoints hold only tensors, numbers and strings: they load with the weights-only unpickler
    def save(self) -> None:
        """The run's state, written by the first process only (every process holds the same)."""
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "settings": dataclasses.asdict(self.settings),
            "trained": {n: m.state_dict() for n, m in self.trained.items()},
            "ema": {n: m.state_dict() for n, m in self.ema.shadow.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data_rng": json.dumps(self.data_rng.bit_generator.state),
            "noise_rng": self.noise_rng.get_state(),
        }
        tmp = self.run / f"{self.settings.stage}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.run / f"{self.settings.stage}.pt")

    def resume(self) -> None:
        state = torch.load(self.run / f"{self.settings.stage}.pt", map_location=self.device, weights_only=True)
        self.step = state["step"]
        for name, module in self.trained.items():
            module.load_state_dict(state["trained"][name])
            self.ema.shadow[name].load_state_dict(state["ema"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.data_rng.bit_generator.state = json.loads(state["data_rng"])
        self.noise_rng.set_state(state["noise_rng"])
        self.forget_logged_steps_after(self.step)

    def forget_logged_steps_after(self, step: int) -> None:
        """An interrupted run logged steps that its last checkpoint does not hold: they are trained again."""
        log = self.run / "loss.log"
        if log.exists() and self.rank == 0:
            lines = log.read_text().splitlines(keepends=True)
            stale = lambda line: line.startswith(f"{self.settings.stage},") and int(line.split(",")[1]) > step
            log.write_text("".join(line for line in lines if not stale(line)))

    def computing(self) -> contextlib.ExitStack:
        """The context every forward pass runs in: autocast with mixed precision, the math attention kernel where it
        is the faster one."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None))
        if self.math_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def next_batch(self) -> tuple:
        """The vae stage's (images,), or the diffusion stage's (moments, captions, source moments or None)."""
        n = self.settings.batch_size
        if self.pool is not None:
            return self.pool.batch(self.data_rng, n, self.share)
        images, captions, sources = self.data.batch(self.data_rng, n, self.share)
        if self.settings.stage == "vae":
            return (images.to(self.device, self.dtype),)
        return self.diffusion_batch(images, captions, sources)

    def vae_loss(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.models.encoder.cfg
        side = images.shape[-1] // cfg.pixels_per_latent
        noise = self.noise((len(images), cfg.latent_channels, side, side))
        decoded, mean, logvar = self.step_module(images, noise)
        return autoencoder_loss(decoded, images, mean, logvar, self.settings.edge_weight, self.settings.kl_weight)

    def diffusion_loss(
        self, moments: torch.Tensor, captions: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """moments, sources: [B, 8, h, w] posteriors (see moments) of the images and of what to noise instead (this
        process's share of the batch)."""
        n, mine = self.whole(len(captions))
        z0 = self.sample_latents(moments)
        dropped = (torch.rand(n, generator=self.noise_rng) < self.settings.caption_dropout)[mine]
        captions = ["" if drop else c for c, drop in zip(captions, dropped)]
        t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=self.noise_rng)[mine].to(self.device)
        a = self.alphas_cumprod[t][:, None, None, None]
        eps = self.noise(z0.shape).to(z0)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = eps
        extra = None
        if self.settings.inpainting:  # sources: the condition (see diffusion_batch)
            extra = torch.cat([sources[:, :1], self.sample_latents(sources[:, 1:])], dim=1)
        elif sources is not None:
            z_t, target = self.edited(z_t, eps, z0, moments, sources, a, ~dropped.to(self.device))
        tokens = self.models.tokenizer(captions).to(self.device)
        error = (self.step_module(z_t, t, tokens, extra).to(target.dtype) - target).pow(2).mean(dim=(1, 2, 3))
        return (self.loss_weights(t) * error).mean()

    def whole(self, share: int) -> tuple[int, slice]:
        """The whole batch's size for a share of `share` samples, and where this process's share lies in it."""
        return share * self.world, slice(self.rank * share, (self.rank + 1) * share)

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise for this process's share of a batch, `shape` being the share's, from the run's
        noise generator: drawn for the whole batch, on the CPU, so it is the same on every device and in every
        process."""
        n, mine = self.whole(shape[0])
        return torch.randn((n, *shape[1:]), generator=self.noise_rng)[mine].to(self.device)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 8, h, w] in the models' precision, whatever the autocast: the frozen autoencoder's posterior q(z | x),
        its mean and log-variance stacked on the channels (as LDM's encoder outputs them)."""
        return torch.cat([x.to(self.dtype) for x in self.models.encoder(images.to(self.device, self.dtype))], dim=1)

    def diffusion_batch(self, images: torch.Tensor, captions: list[str], sources: torch.Tensor | None) -> tuple:
        """A data batch's (moments, captions, source moments or None); a source is encoded only where it differs
        from its image. Inpainting: `sources` are the masks [B, 1, H, W], and the third part is the condition [B, 9,
        h, w]: the mask at latent size (nearest, as the pipeline's) and the masked image's posterior moments."""
        moments = self.moments(images)
        if self.settings.inpainting:
            masked = self.moments(images * (sources < 0.5))
            small = F.interpolate(sources.to(masked), size=masked.shape[2:])
            return moments, captions, torch.cat([small, masked], dim=1)
        if sources is None:
            return moments, captions, None
        changed = (sources != images).flatten(1).any(dim=1)
        source_moments = moments.clone()
        if changed.any():
            source_moments[changed.to(self.device)] = self.moments(sources[changed])
        return moments, captions, source_moments

    @torch.no_grad()
    def sample_latents(self, moments: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w]: a draw from the posterior q(z | x) (`moments`), at the pipeline's scale."""
        mean, logvar = moments.chunk(2, dim=1)
        return self.models.encoder.cfg.scaling_factor * sample_posterior(mean, logvar, self.noise(mean.shape).to(mean))

    def edited(self, z_t, eps, z0, moments, sources, a, captioned) -> tuple[torch.Tensor, torch.Tensor]:
        """Noised sources in place of noised images, where a source differs, the caption was kept and
        SNR <= 1: z_t = sqrt(a) z_src + sqrt(1 - a) eps, and the target is the noise that denoises it to the
        caption's image, eps + sqrt(a / (1 - a)) (z_src - z0). Image-to-image starts from exactly such a z_t; plain
        training never shows a caption that contradicts the noisy image, and there the model moved a re-coloured
        shape instead of re-colouring it. At SNR > 1 the image is mostly decided: the targets would be large and the
        edit is left to the steps before."""
        differs = (sources != moments).flatten(1).any(dim=1)
        edit = differs & captioned & (a.flatten() <= 1 - a.flatten())
        z_src = self.sample_latents(sources)  # drawn for every sample: the same noise whichever process edits which
        if not edit.any():
            return z_t, eps
        z_src, a = z_src[edit], a[edit]
        z_t, target = z_t.clone(), eps.clone()
        z_t[edit] = a.sqrt() * z_src + (1 - a).sqrt() * eps[edit]
        target[edit] = eps[edit] + (a / (1 - a)).sqrt() * (z_src - z0[edit])
        return z_t, target

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """[B] weights of the per-sample noise errors at timesteps t: 1, or with --min-snr-gamma min(SNR, gamma) /
        SNR (see losses.min_snr_weights; docs/training.md has what it did to the shapes model)."""
        if self.settings.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        return min_snr_weights(self.alphas_cumprod[t], self.settings.min_snr_gamma)

    def train(self, log) -> None:
        s = self.settings
        if s.stage == "diffusion" and s.latent_pool and self.pool is None:
            rng = np.random.default_rng((s.seed, 1))  # its own generator: a resumed run rebuilds the same pool
            with self.computing():
                self.pool = LatentPool(self.data, self.diffusion_batch, s.latent_pool, rng)
        bar = tqdm(total=s.steps, initial=self.step, desc=s.stage, dynamic_ncols=True, disable=self.rank != 0)
        started = time.time()
        loss_of = self.vae_loss if s.stage == "vae" else self.diffusion_loss
        while self.step < s.steps:
            with self.computing():
                loss = loss_of(*self.next_batch())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for m in self.trained.values() for p in m.parameters()], s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            self.ema.update(self.trained, self.step)
            self.step += 1
            loss = self.batch_mean(loss.detach())
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            log.write(f"{s.stage},{self.step},{loss:.6f},{time.time() - started:.1f}\n")
            if self.step % s.save_every == 0 or self.step == s.steps:
                log.flush()
                self.save()
        bar.close()

    def batch_mean(self, loss: torch.Tensor) -> float:
        """The whole batch's loss: the mean of the processes' shares."""
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item()

    def use_ema(self) -> None:
        """Puts the EMA weights into the models (what is exported and evaluated)."""
        for name, module in self.trained.items():
            module.load_state_dict(self.ema.shadow[name].state_dict())
            module.eval().requires_grad_(False)


@torch.no_grad()
def normalise_latents(models: Models, data, rng: np.random.Generator, batches: int = 8) -> float:
    """Rescales the encoder's output (and the decoder's input to match) so that latents have SD v1's standard
    deviation, 1 / scaling_factor; returns the factor. The autoencoder's function is unchanged."""
    means = torch.cat(
        [models.encoder(data.batch(rng, 32)[0].to(models.encoder.conv_in.weight.device))[0] for _ in range(batches)]
    )
    factor = (1 / models.encoder.cfg.scaling_factor) / means.std().item()
    quant, post = models.encoder.quant_conv, models.decoder.post_quant_conv
    half = quant.out_channels // 2
    quant.weight[:half] *= factor  # mean
    quant.bias[:half] *= factor
    quant.bias[half:] += 2 * math.log(factor)  # log-variance
    post.weight /= factor
    return factor


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's compute type: bf16 where the device has it (CPUs with AVX512-BF16 or AMX run it faster than
    fp32), else fp16 (older GPUs)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
