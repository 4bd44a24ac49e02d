"""The training run: one stage's settings, the loop (AdamW, gradient clipping, EMA, mixed precision), its
checkpoints and exact resume, and the autoencoder's latent rescaling after stage 1."""

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from sd.autoencoder import sample_posterior
from sd.models import Models
from sd.sampling import alphas_cumprod
from sd.train.data import LatentPool
from sd.train.ema import EMA
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


class Trainer:
    def __init__(self, models: Models, settings: Settings, data, run: Path, device: torch.device):
        self.models, self.settings, self.data, self.run, self.device = models, settings, data, run, device
        if settings.stage == "vae":
            self.trained = {"encoder": models.encoder, "decoder": models.decoder}
        else:
            self.trained = {"diffusion": models.diffusion} | (
                {"clip": models.clip} if settings.train_text_encoder else {}
            )
        for net in models.named().values():
            net.requires_grad_(False).eval()
        for net in self.trained.values():
            net.requires_grad_(True).train()
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
        if log.exists():
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
            return self.pool.batch(self.data_rng, n)
        images, captions, sources = self.data.batch(self.data_rng, n)
        if self.settings.stage == "vae":
            return (images.to(self.device),)
        return self.diffusion_batch(images, captions, sources)

    def vae_loss(self, images: torch.Tensor) -> torch.Tensor:
        mean, logvar = (x.float() for x in self.models.encoder(images))  # fp32 whatever the autocast
        z = sample_posterior(mean, logvar, self.randn(mean))
        s = self.settings
        return autoencoder_loss(self.models.decoder(z), images, mean, logvar, s.edge_weight, s.kl_weight)

    def diffusion_loss(
        self, moments: torch.Tensor, captions: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """moments, sources: [B, 8, h, w] posteriors (see moments) of the images and of what to noise instead."""
        z0 = self.sample_latents(moments)
        dropped = torch.rand(len(captions), generator=self.noise_rng) < self.settings.caption_dropout
        captions = ["" if drop else c for c, drop in zip(captions, dropped)]
        with torch.set_grad_enabled(self.settings.train_text_encoder):
            context = self.models.clip(self.models.tokenizer(captions).to(self.device))
        t = torch.randint(0, len(self.alphas_cumprod), (len(captions),), generator=self.noise_rng).to(self.device)
        a = self.alphas_cumprod[t][:, None, None, None]
        eps = self.randn(z0)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = eps
        if sources is not None:
            z_t, target = self.edited(z_t, eps, z0, moments, sources, a, ~dropped.to(self.device))
        error = (self.models.diffusion(z_t, t, context).float() - target).pow(2).mean(dim=(1, 2, 3))
        return (self.loss_weights(t) * error).mean()

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped and typed like `like`, from the run's noise generator (on the CPU: the same on every device)."""
        return torch.randn(like.shape, generator=self.noise_rng).to(like)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 8, h, w] fp32, whatever the autocast: the frozen autoencoder's posterior q(z | x), its mean and
        log-variance stacked on the channels (as LDM's encoder outputs them)."""
        return torch.cat([x.float() for x in self.models.encoder(images.to(self.device))], dim=1)

    def diffusion_batch(self, images: torch.Tensor, captions: list[str], sources: torch.Tensor | None) -> tuple:
        """A data batch's (moments, captions, source moments or None); a source is encoded only where it differs
        from its image."""
        moments = self.moments(images)
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
        return self.models.encoder.cfg.scaling_factor * sample_posterior(mean, logvar, self.randn(mean))

    def edited(self, z_t, eps, z0, moments, sources, a, captioned) -> tuple[torch.Tensor, torch.Tensor]:
        """Noised sources in place of noised images, where a source differs, the caption was kept and
        SNR <= 1: z_t = sqrt(a) z_src + sqrt(1 - a) eps, and the target is the noise that denoises it to the
        caption's image, eps + sqrt(a / (1 - a)) (z_src - z0). Image-to-image starts from exactly such a z_t; plain
        training never shows a caption that contradicts the noisy image, and there the model moved a re-coloured
        shape instead of re-colouring it. At SNR > 1 the image is mostly decided: the targets would be large and the
        edit is left to the steps before."""
        differs = (sources != moments).flatten(1).any(dim=1)
        edit = differs & captioned & (a.flatten() <= 1 - a.flatten())
        if not edit.any():
            return z_t, eps
        z_src, a = self.sample_latents(sources[edit]), a[edit]
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
        bar = tqdm(total=s.steps, initial=self.step, desc=s.stage, dynamic_ncols=True)
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
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(f"{s.stage},{self.step},{loss.item():.6f},{time.time() - started:.1f}\n")
            if self.step % s.save_every == 0 or self.step == s.steps:
                log.flush()
                self.save()
        bar.close()

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
