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

Both: AdamW, gradient clipping, EMA weights (what gets exported), a fixed seed, a checkpoint every `--save-every`
steps that `--resume` continues from exactly, a tqdm bar with the loss, a loss log (`loss.log` in the run folder),
mixed precision (bf16, or fp16 on older GPUs) and gradient checkpointing on request.

    python -m sd.train --data shapes --run runs/shapes --export weights/shapes.safetensors     # the built-in model
    python -m sd.train --data my_images/ --init sd15.safetensors --run runs/mine --steps 2000 --export mine.safetensors

A data folder holds images with captions beside them (`cat.png` + `cat.txt`).
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from sd.clip import CLIP, CLIPConfig
from sd.decoder import Decoder
from sd.diffusion import UNet, UNetConfig
from sd.encoder import Encoder, VAEConfig
from sd.model_loader import Models, load_models, native_metadata, save_atomically
from sd.pipeline import LATENT_SCALE
from sd.samplers import alphas_cumprod
from sd.tokenizer import default_tokenizer

# The built-in model: every kind of SD v1 block, small enough to train on two CPU cores in about two hours. Its VAE
# downsamples 4x, not 8x: 64x64 images need 16x16 latents to keep a star a star. Its heads follow SD v1's conventions
# (8 in the UNet, 64-wide in CLIP), so its single-file export loads like any SD v1 file.
SHAPES_CONFIGS = {
    "clip": CLIPConfig(width=128, layers=3, heads=2, mlp_width=512),
    "vae": VAEConfig(channels=32, channel_mult=(1, 1, 2), num_res_blocks=1),  # 4x: 16x16x4 latents
    "unet": UNetConfig(
        channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(False, True, True), context_dim=128
    ),
}


TINY_CONFIGS = {"clip": CLIPConfig.tiny(), "vae": VAEConfig.tiny(), "unet": UNetConfig.tiny()}


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


# -- data -----------------------------------------------------------------------------------------------------------


class ShapesData:
    """The synthetic shapes, drawn afresh for every batch (see sd/shapes.py). recolour: the fraction of samples whose
    source is the same scene with the shape in another colour (the edit the model then learns; see Trainer.edited)."""

    image_size = 64

    def __init__(self, recolour: float = 0.0):
        if not 0 <= recolour <= 1:
            raise ValueError(f"recolour is a fraction of samples, in [0, 1]; got {recolour}")
        self.recolour = recolour

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """(images [n, 3, 64, 64] in [-1, 1], captions, sources: images to noise instead, or None: the images)."""
        from sd.shapes import caption, random_scene, recoloured

        scenes = [random_scene(rng) for _ in range(n)]
        captions = [caption(scene, rng) for scene in scenes]
        images = self.draw(scenes)
        if not self.recolour:
            return images, captions, None
        changed = {i: recoloured(scene, rng) for i, scene in enumerate(scenes) if rng.random() < self.recolour}
        sources = images.clone()
        if changed:
            sources[list(changed)] = self.draw(list(changed.values()))
        return images, captions, sources

    @staticmethod
    def draw(scenes) -> torch.Tensor:
        from sd.shapes import render

        return to_tensor(np.stack([np.asarray(render(scene)) for scene in scenes]))


class LatentPool:
    """Diffusion batches drawn from `size` samples that the frozen autoencoder encoded once: each draw takes a fresh
    latent from a sample's posterior, with fresh noise, timestep and caption dropout (a sample keeps the caption it was
    drawn with). On 2 CPU cores encoding a batch took a fifth of a shapes UNet step."""

    def __init__(self, data, encoded, size: int, rng: np.random.Generator, chunk: int = 64):
        """encoded: (images, captions, sources) -> (moments, captions, source moments or None), as Trainer.encoded."""
        parts = []
        with tqdm(total=size, desc="latent pool", dynamic_ncols=True) as bar:
            for start in range(0, size, chunk):
                parts.append(encoded(*data.batch(rng, min(chunk, size - start))))
                bar.update(len(parts[-1][1]))
        self.moments = torch.cat([moments for moments, _, _ in parts])
        self.captions = [c for _, captions, _ in parts for c in captions]
        self.sources = None if parts[0][2] is None else torch.cat([sources for _, _, sources in parts])

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        picks = rng.integers(len(self.captions), size=n)
        sources = None if self.sources is None else self.sources[picks]
        return self.moments[picks], [self.captions[i] for i in picks], sources


class FolderData:
    """Images with a caption file beside each (`x.png` + `x.txt`), resized and centre-cropped to a square."""

    def __init__(self, folder: Path, image_size: int):
        self.image_size = image_size
        self.items = [
            (p, p.with_suffix(".txt"))
            for p in sorted(folder.iterdir())
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.with_suffix(".txt").is_file()
        ]
        if not self.items:
            raise ValueError(f"{folder}: no images with captions (expected pairs such as cat.png + cat.txt)")

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str], None]:
        picks = [self.items[i] for i in rng.integers(len(self.items), size=n)]
        images = np.stack([np.asarray(self.square(Image.open(p).convert("RGB"))) for p, _ in picks])
        return to_tensor(images), [t.read_text().strip() for _, t in picks], None

    def square(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((self.image_size,) * 2, Image.LANCZOS)


def edges(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: the largest colour step to a neighbouring pixel, spread over 3x3 (0 in flat areas, up to 2)."""
    dx = F.pad((images[..., :, 1:] - images[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((images[..., 1:, :] - images[..., :-1, :]).abs(), (0, 0, 0, 1))
    return F.max_pool2d(torch.maximum(dx, dy).amax(dim=1, keepdim=True), 3, stride=1, padding=1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] in [-1, 1], contiguous: a channels-last batch would run every layer
    channels-last, where bf16 GroupNorm's backward is 20x slower on CPU."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1


# -- the run: models, optimiser, EMA, checkpoints --------------------------------------------------------------------


class EMA:
    """An exponential moving average of parameters with a warm-up: decay min(d, (1 + n) / (c + n)) at step n. The
    usual c = 10 averages over about the last tenth of a run; a smaller c averages over a longer stretch of it."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float, warmup: float):
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (self.warmup + step))
        for name, module in modules.items():
            for ema, p in zip(self.shadow[name].parameters(), module.parameters()):
                ema.lerp_(p.detach(), 1 - decay)


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
        # the fused kernel: for the shapes model on 2 CPU cores its step takes 14 ms instead of 66 (of ~0.9 s a step)
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
        # In bf16 on CPU the flash attention kernel's backward is slow with small heads: the shapes model's UNet step
        # takes 0.75x the time with the math kernel. That holds whole attention matrices, too many at SD's 4096 tokens.
        small = (data.image_size // models.encoder.cfg.scale_factor) ** 2 <= 1024
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
        return (images.to(self.device),) if self.settings.stage == "vae" else self.encoded(images, captions, sources)

    def vae_loss(self, images: torch.Tensor) -> torch.Tensor:
        z, mean, logvar = self.posterior(images)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        weight = 1 + self.settings.edge_weight * edges(images)
        error = ((self.models.decoder(z).float() - images).abs() * weight).mean() / weight.mean()
        return error + self.settings.kl_weight * kl

    def diffusion_loss(
        self, moments: torch.Tensor, captions: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """moments, sources: [B, 8, h, w] posteriors (see encode) of the images and of what to noise instead."""
        z0 = self.latents(moments)
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

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, mean, logvar), each [B, 4, h, w] in fp32 whatever the autocast: a draw from q(z | x) and its
        parameters."""
        mean, logvar = (x.float() for x in self.models.encoder(images))
        return mean + torch.exp(0.5 * logvar) * self.randn(mean), mean, logvar

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 8, h, w] fp32, whatever the autocast: the frozen autoencoder's posterior q(z | x), its mean and
        log-variance stacked on the channels (as LDM's encoder outputs them)."""
        return torch.cat([x.float() for x in self.models.encoder(images.to(self.device))], dim=1)

    def encoded(self, images: torch.Tensor, captions: list[str], sources: torch.Tensor | None) -> tuple:
        """A diffusion batch from a data batch: (moments, captions, source moments or None); a source is encoded only
        where it differs from its image."""
        moments = self.encode(images)
        if sources is None:
            return moments, captions, None
        changed = (sources != images).flatten(1).any(dim=1)
        source_moments = moments.clone()
        if changed.any():
            source_moments[changed.to(self.device)] = self.encode(sources[changed])
        return moments, captions, source_moments

    @torch.no_grad()
    def latents(self, moments: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w]: a draw from the posterior q(z | x) (as `encode` gives it), at the pipeline's scale."""
        mean, logvar = moments.chunk(2, dim=1)
        return LATENT_SCALE * (mean + torch.exp(0.5 * logvar) * self.randn(mean))

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
        z_src, a = self.latents(sources[edit]), a[edit]
        z_t, target = z_t.clone(), eps.clone()
        z_t[edit] = a.sqrt() * z_src + (1 - a).sqrt() * eps[edit]
        target[edit] = eps[edit] + (a / (1 - a)).sqrt() * (z_src - z0[edit])
        return z_t, target

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """[B] weights of the per-sample noise errors at timesteps t: 1, or with Min-SNR-gamma (Hang et al. 2023)
        min(SNR, gamma) / SNR, SNR = a_t / (1 - a_t). Low-noise steps have large, conflicting gradients and decide
        little of the image; capping their weight makes training converge faster (on the shapes model, 4,000 steps
        draw 89% of colours right instead of 74%), though a 6,000-step model kept fewer re-coloured shapes in place
        than the 12,000-step plain one (55% against 68%), so it is not the default."""
        if self.settings.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        a = self.alphas_cumprod[t]
        snr = a / (1 - a)
        return snr.clamp(max=self.settings.min_snr_gamma) / snr

    def train(self, log) -> None:
        s = self.settings
        if s.stage == "diffusion" and s.latent_pool and self.pool is None:
            with self.computing():  # its own generator: a resumed run rebuilds the same pool
                self.pool = LatentPool(self.data, self.encoded, s.latent_pool, np.random.default_rng((s.seed, 1)))
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
    deviation, 1 / LATENT_SCALE; returns the factor. The autoencoder's function is unchanged."""
    means = torch.cat(
        [models.encoder(data.batch(rng, 32)[0].to(models.encoder.conv_in.weight.device))[0] for _ in range(batches)]
    )
    factor = (1 / LATENT_SCALE) / means.std().item()
    quant, post = models.encoder.quant_conv, models.decoder.post_quant_conv
    half = quant.out_channels // 2
    quant.weight[:half] *= factor  # mean
    quant.bias[:half] *= factor
    quant.bias[half:] += 2 * math.log(factor)  # log-variance
    post.weight /= factor
    return factor


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's compute type: bf16 where the device has it (CPUs too: on 2 AVX512-BF16 cores the shapes
    model's training steps take 0.6x (autoencoder) and 0.75x (UNet) of fp32's time), else fp16 (older GPUs)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def fresh_models(configs: dict, device: torch.device) -> Models:
    torch.manual_seed(0)
    with torch.device(device):
        nets = {
            "clip": CLIP(configs["clip"]),
            "encoder": Encoder(configs["vae"]),
            "decoder": Decoder(configs["vae"]),
            "diffusion": UNet(configs["unet"]),
        }
    return Models(default_tokenizer(), **nets, source="from scratch", format="fresh")


def export(models: Models, path: Path, command: str, dtype: torch.dtype = torch.float16) -> None:
    """The native file (configs, image size and the training command in its metadata), written atomically."""
    from sd.model_converter import to_native

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
    p = argparse.ArgumentParser(prog="python -m sd.train", description=__doc__.splitlines()[0])
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
    from safetensors.torch import load_file

    from sd.model_converter import from_native

    if not (run / "vae.safetensors").is_file():
        raise ValueError(f"{run}: no trained autoencoder (vae.safetensors); run stage vae first")
    components = from_native(load_file(run / "vae.safetensors", device=str(device)))
    models.encoder.load_state_dict(components["encoder"])
    models.decoder.load_state_dict(components["decoder"])


if __name__ == "__main__":
    sys.exit(main())
