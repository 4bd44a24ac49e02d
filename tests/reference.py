"""Seeded random checkpoints in the public SD v1 layout, and the diffusers/transformers networks built from them.

The reference side goes through diffusers' own single-file conversion (`from_single_file` with the LDM yaml) and
transformers' `CLIPTextModel`, exactly as a user of those libraries would load the same file.
"""

import contextlib
import json
import math
from pathlib import Path

import torch

from sd.autoencoder import VAEConfig
from sd.clip import CLIP, CLIPConfig
from sd.decoder import Decoder
from sd.diffusion import UNet, UNetConfig
from sd.encoder import Encoder
from sd.model_converter import from_ldm, to_ldm
from sd.model_loader import load_component

DATA = Path(__file__).parent / "data"
SCHEDULE_KEYS = (
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2"
).split()


def public_key_shapes(inpainting: bool = False) -> dict[str, tuple[list[int], str]]:
    """Every key of the public v1.5 file (or its inpainting variant), in file order: {key: (shape, dtype)}."""
    name = "sd_v1_inpaint_ldm_keys.json" if inpainting else "sd_v1_ldm_keys.json"
    return {k: (shape, dtype) for k, (shape, dtype) in json.loads((DATA / name).read_text()).items()}


# every sampler, with and without its Karras schedule where it has one, as the tests run them against diffusers
SAMPLER_CASES = [
    ("ddpm", False),
    ("ddim", False),
    ("plms", False),
    ("euler", False),
    ("euler", True),
    ("euler_a", False),
    ("lms", False),
    ("lms", True),
    ("dpmpp_2m", False),
    ("dpmpp_2m", True),
    ("lcm", False),
]
SAMPLER_IDS = [f"{name}{'-karras' if karras else ''}" for name, karras in SAMPLER_CASES]


def meta_networks(clip_cfg: CLIPConfig, vae_cfg: VAEConfig, unet_cfg: UNetConfig) -> dict[str, torch.nn.Module]:
    """Our four networks on the meta device: their keys and shapes, no memory."""
    with torch.device("meta"):
        return {
            "clip": CLIP(clip_cfg),
            "encoder": Encoder(vae_cfg),
            "decoder": Decoder(vae_cfg),
            "diffusion": UNet(unet_cfg),
        }


def ldm_key_shapes(clip_cfg: CLIPConfig, vae_cfg: VAEConfig, unet_cfg: UNetConfig) -> dict[str, tuple[list, str]]:
    """The public file's layout for any config: our modules' keys in public names, plus the public extras."""
    nets = meta_networks(clip_cfg, vae_cfg, unet_cfg)
    weights = to_ldm({name: net.state_dict() for name, net in nets.items()})
    shapes = {key: ([1000], "float32") for key in SCHEDULE_KEYS}
    shapes |= {"model_ema.decay": ([], "float32"), "model_ema.num_updates": ([], "int32")}
    shapes |= {key: (list(t.shape), "float32") for key, t in weights.items()}
    shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = ([1, clip_cfg.max_positions], "int64")
    return shapes


def _schedule() -> dict[str, torch.Tensor]:
    """SD v1's training schedule buffers (scaled-linear betas), so the random file carries plausible values."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    var = betas * (1 - a_prev) / (1 - a)
    values = {
        "betas": betas,
        "alphas_cumprod": a,
        "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - a).log(),
        "sqrt_recip_alphas_cumprod": a.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
        "posterior_variance": var,
        "posterior_log_variance_clipped": var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
        "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a),
    }
    return {k: v.float() for k, v in values.items()}


def random_checkpoint(key_shapes: dict[str, tuple[list, str]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for every key, scaled so that every layer contributes and activations stay O(1).

    Matrices and convolutions ~ N(0, 1/fan_in) (none left at zero, unlike the CompVis init of output convs);
    norm scales ~ 1 + N(0, 0.1^2); biases ~ N(0, 0.1^2).
    """
    gen = torch.Generator().manual_seed(seed)
    schedule = _schedule()
    out = {}
    for key, (shape, _) in key_shapes.items():
        if key in schedule:
            out[key] = schedule[key]
        elif key.endswith("position_ids"):
            out[key] = torch.arange(shape[-1]).reshape(shape)
        elif key == "model_ema.decay":
            out[key] = torch.tensor(0.9999)
        elif key == "model_ema.num_updates":
            out[key] = torch.tensor(0, dtype=torch.int32)
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out


def our_networks(checkpoint: dict[str, torch.Tensor], clip_cfg, vae_cfg, unet_cfg) -> dict[str, torch.nn.Module]:
    """Our four networks, built on the meta device and given the checkpoint's tensors (shared, not copied)."""
    components, _ = from_ldm(checkpoint)
    nets = meta_networks(clip_cfg, vae_cfg, unet_cfg)
    for name, net in nets.items():
        load_component(net, components[name], name)
        net.eval()
    return nets


def original_config(vae_cfg: VAEConfig, unet_cfg: UNetConfig) -> dict:
    """The LDM inference yaml (as a dict) that describes these configs, for diffusers' single-file loader."""
    downsample_factors = [2**level for level, on in enumerate(unet_cfg.attention_levels) if on]
    return {
        "model": {
            "params": {
                "scale_factor": 0.18215,
                "unet_config": {
                    "params": {
                        "in_channels": unet_cfg.in_channels,
                        "out_channels": unet_cfg.out_channels,
                        "model_channels": unet_cfg.channels,
                        "attention_resolutions": downsample_factors,
                        "num_res_blocks": unet_cfg.num_res_blocks,
                        "channel_mult": list(unet_cfg.channel_mult),
                        "num_heads": unet_cfg.heads,
                        "use_spatial_transformer": True,
                        "transformer_depth": unet_cfg.transformer_depth,
                        "context_dim": unet_cfg.context_dim,
                        "legacy": False,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "embed_dim": vae_cfg.latent_channels,
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": vae_cfg.latent_channels,
                            "resolution": 256,
                            "in_channels": vae_cfg.image_channels,
                            "out_ch": vae_cfg.image_channels,
                            "ch": vae_cfg.channels,
                            "ch_mult": list(vae_cfg.channel_mult),
                            "num_res_blocks": vae_cfg.num_res_blocks,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                    }
                },
            }
        }
    }


def reference_unet(checkpoint, vae_cfg: VAEConfig, unet_cfg: UNetConfig):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = UNet2DConditionModel.from_single_file(checkpoint, original_config=original_config(vae_cfg, unet_cfg))
    _assert_fully_loaded(model, convert_ldm_unet_checkpoint(checkpoint, model.config))
    return model


def reference_vae(checkpoint, vae_cfg: VAEConfig, unet_cfg: UNetConfig):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model = AutoencoderKL.from_single_file(checkpoint, original_config=original_config(vae_cfg, unet_cfg))
    _assert_fully_loaded(model, convert_ldm_vae_checkpoint(checkpoint, model.config))
    return model


def reference_clip(checkpoint, clip_cfg: CLIPConfig, folder: Path):
    """transformers' CLIPTextModel given the checkpoint's text encoder by diffusers' single-file path."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    clip_text_config(clip_cfg).save_pretrained(folder / "text_encoder")
    model = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=str(folder), subfolder="text_encoder", local_files_only=True
    )
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    _assert_fully_loaded(model, converted)
    return model


def _assert_fully_loaded(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> None:
    """diffusers loads non-strictly; make sure every reference weight came from our checkpoint, unchanged."""
    state = model.state_dict()
    assert set(state) <= set(converted), (
        f"reference weights not in the checkpoint: {sorted(set(state) - set(converted))[:5]}"
    )
    for key, tensor in state.items():
        assert torch.equal(tensor, converted[key].reshape(tensor.shape).to(tensor.dtype)), f"reference {key} differs"


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 1e-4, atol: float = 0.0) -> float:
    """max |ours - ref| <= rtol * max(1, max |ref|) + atol; returns the max abs difference."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference output is not finite"
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    bound = rtol * max(1.0, scale) + atol
    assert diff <= bound, f"{what}: max abs difference {diff:.3e} > {bound:.3e} (reference max abs {scale:.3g})"
    return diff


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives a diffusers/transformers model seeded random weights by the scheme of `random_checkpoint`."""
    shapes = {k: (list(v.shape), "float32") for k, v in model.state_dict().items() if v.is_floating_point()}
    model.load_state_dict(random_checkpoint(shapes, seed), strict=False)
    return model.eval()


def random_diffusers_models(clip_cfg: CLIPConfig, vae_cfg: VAEConfig, unet_cfg: UNetConfig, seed: int = 0):
    """diffusers' UNet and VAE and transformers' CLIPTextModel for these configs (diffusers' own translation of the
    LDM yaml), with seeded random weights: (unet, vae, text_encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextModel

    layout = {
        k: torch.empty(shape, device="meta") for k, (shape, _) in ldm_key_shapes(clip_cfg, vae_cfg, unet_cfg).items()
    }
    yaml = original_config(vae_cfg, unet_cfg)
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(yaml, layout))
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(yaml, layout))
    text_encoder = CLIPTextModel(clip_text_config(clip_cfg))
    return randomize(unet, seed), randomize(vae, seed + 1), randomize(text_encoder, seed + 2)


def clip_text_config(clip_cfg: CLIPConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=clip_cfg.vocab_size,
        max_position_embeddings=clip_cfg.max_positions,
        hidden_size=clip_cfg.width,
        num_hidden_layers=clip_cfg.layers,
        num_attention_heads=clip_cfg.heads,
        intermediate_size=clip_cfg.mlp_width,
        layer_norm_eps=clip_cfg.eps,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
    )


SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "plms": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}


def pipeline_comparable_strength(name: str, strength: float) -> float:
    """The img2img strength at which whole pipelines can be compared with diffusers for sampler `name`. diffusers
    starts LMS's and PLMS's multistep history at the schedule's first step even when img2img starts later (its issue
    5630); ours starts it at the first step taken. So those two agree only from strength 1; test_samplers checks
    their part-way starts against diffusers' step code run on the schedule's tail."""
    return 1.0 if name in ("lms", "plms") else strength


def diffusers_scheduler(name: str, karras: bool = False):
    """Our sampler `name`'s diffusers counterpart, from SD v1.5's scheduler config."""
    import diffusers

    extra = {"use_karras_sigmas": True} if karras else {}
    return getattr(diffusers, DIFFUSERS_SCHEDULERS[name]).from_config(SD15_SCHEDULER, **extra)


def diffusers_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from vocab.json/merges.txt derived from OpenAI's merges file (same ids as SD v1's
    on prompts that need no text fixes)."""
    from make_tokenizer_golden import derive_hf_files
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    derive_hf_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def our_models(checkpoint: dict[str, torch.Tensor], clip_cfg, vae_cfg, unet_cfg):
    """`Models` (what load_models returns) for an in-memory checkpoint."""
    from sd.models import Models
    from sd.tokenizer import default_tokenizer

    return Models(
        default_tokenizer(),
        **our_networks(checkpoint, clip_cfg, vae_cfg, unet_cfg),
        source="memory",
        format="single-file",
    )


def diffusers_pipelines(checkpoint, clip_cfg, vae_cfg, unet_cfg, folder: Path):
    """diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline on the checkpoint's weights (no safety
    checker); set `.scheduler` before each use."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    parts = {
        "unet": reference_unet(checkpoint, vae_cfg, unet_cfg),
        "vae": reference_vae(checkpoint, vae_cfg, unet_cfg),
        "text_encoder": reference_clip(checkpoint, clip_cfg, folder),
        "tokenizer": diffusers_tokenizer(folder / "tokenizer"),
        "scheduler": diffusers_scheduler("euler_a"),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    return StableDiffusionPipeline(**parts), StableDiffusionImg2ImgPipeline(**parts)


@contextlib.contextmanager
def speedup_references(pipeline, deepcache: tuple[int, int] | None = None, tome: float = 0.0):
    """diffusers' pipeline with the speed-ups' reference implementations for the block's duration: DeepCache's
    DeepCacheSDHelper (cache_interval, cache_branch_id) and tomesd (ratio, use_rand=False)."""
    import tomesd
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipeline)
    if deepcache:
        helper.set_params(cache_interval=deepcache[0], cache_branch_id=deepcache[1])
        helper.enable()
    if tome:
        tomesd.apply_patch(pipeline, ratio=tome, use_rand=False)
    try:
        yield pipeline
    finally:
        tomesd.remove_patch(pipeline)
        if deepcache:
            helper.disable()
