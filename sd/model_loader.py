"""Reads any public SD v1.x checkpoint format safely, works out the networks' configs, and builds the networks.

Formats are told apart by their contents, never by file name: a single-file checkpoint (`.safetensors`, or a
`.ckpt`/`.pt` pickle with or without `state_dict` wrappers), a diffusers folder, or our own native file (written
by convert_weights.py). What is not SD v1.x (SD 2.x, SDXL, a LoRA, an embedding, a lone VAE, a truncated file) is
refused with a one-line message saying what it is.

Networks are built on the meta device and adopt the file's tensors (memory-mapped where the format allows), so the
weights are never held twice; a dtype change converts each tensor once.
"""

import contextlib
import hashlib
import json
import re
import struct
from pathlib import Path

import torch

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.model_converter import (
    COMPONENTS,
    from_diffusers_unet,
    from_diffusers_vae,
    from_ldm,
    from_ldm_vae,
    from_native,
    from_transformers_clip,
    indices,
    name_keys,
)
from sd.models import CheckpointError, Models, check_device, networks
from sd.native import NATIVE_FORMAT, configs_from_metadata
from sd.package_data import package_file
from sd.tokenizer import Tokenizer, default_tokenizer

DEFAULT_CHECKPOINT = package_file("weights", "shapes.safetensors")


def load_models(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    vae: str | Path | None = None,
) -> Models:
    """Everything SD v1.x needs from a checkpoint: a single file, a diffusers folder or our native file; without
    one, the built-in shapes model (weights/shapes.safetensors).

    ema: take the UNet's EMA copy from a full training file (default: the raw weights, as diffusers does).
    vae: a replacement autoencoder file or diffusers vae/ folder (such as vae-ft-mse-840000-ema-pruned).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    if not isinstance(path, (str, Path, type(None))):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    check_device(torch.device(device))
    path = Path(DEFAULT_CHECKPOINT if path is None else path)
    tokenizer, hints, ignored, configs, image_size, command = default_tokenizer(), {}, {}, {}, 512, ""
    if path.is_dir():
        components, hints, tokenizer = read_diffusers_folder(path)
        layout = "diffusers"
    else:
        state, metadata = read_checkpoint(path)
        layout = identify(state, metadata, path)
        if layout == "native":
            components, configs = from_native(state), configs_from_metadata(metadata, path)
        else:
            components, ignored = from_ldm(state, ema=ema)
        image_size = int(metadata.get("image_size", image_size))
        command = metadata.get("command", "")
    if ema and layout != "single-file":
        raise CheckpointError(f"{path}: --ema applies to full single-file training checkpoints only")
    if vae is not None:
        components |= read_vae(vae)
    if missing := [c for c in COMPONENTS if c not in components]:
        raise CheckpointError(f"{path}: no {', '.join(missing)} weights in this file; pass a full SD v1.x checkpoint")
    configs.setdefault("clip", infer_clip_config(components["clip"], hints.get("clip_heads")))
    configs.setdefault("diffusion", infer_diffusion_config(components["diffusion"], hints.get("unet_heads", 8)))
    if vae is not None or "vae" not in configs:
        configs["vae"] = infer_vae_config(components["encoder"], components["decoder"])
    nets = build(components, configs, device, dtype)
    return Models(
        tokenizer, **nets, source=str(path), format=layout, ignored=ignored, image_size=image_size, command=command
    )


# -- reading files ----------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat {key: tensor}, safetensors metadata) of a .safetensors file or a .ckpt/.pt pickle, by content.

    Pickles go through torch's weights-only unpickler: a file that would run code is refused, never run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass the path of an SD v1.x checkpoint")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
    if len(head) == 9 and head[8:9] == b"{" and 8 < struct.unpack("<Q", head[:8])[0] + 8 <= size:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(path), metadata
        except Exception as error:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({error})") from None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        state = _load_pickle(path, zipped=head[:4] == b"PK\x03\x04")
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: a pickle of {type(state).__name__}, not a checkpoint's weights")
        return state, {}
    raise CheckpointError(f"{path}: not a checkpoint (neither a safetensors file nor a PyTorch pickle)")


# What SD v1 .ckpt files reference besides tensors: PyTorch Lightning's checkpoint callback (saved as a dict key by
# sd-v1-1..4) and numpy scalars in its state. The unpickler gets an inert stand-in: nothing is imported or run.
TRAINING_METADATA = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
)


class Inert:
    """Stands in for training metadata in a pickle; takes any arguments and state, and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_pickle(path: Path, zipped: bool) -> object:
    try:
        with torch.serialization.safe_globals([(Inert, name) for name in TRAINING_METADATA]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as error:
        if culprit := re.search(r"GLOBAL ([\w.]+)", str(error)):
            raise CheckpointError(
                f"{path}: refused: loading this pickle would call {culprit.group(1)}; "
                "sd reads only tensors from .ckpt files"
            ) from None
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({detail})") from None


def identify(state: dict, metadata: dict[str, str], path: Path) -> str:
    """ "single-file" or "native"; anything else is refused with what it is."""
    keys = list(state)
    if any("lora_" in k or ".lora." in k or k.endswith((".alpha", "lora_A.weight")) for k in keys):
        raise CheckpointError(f"{path}: a LoRA, not a checkpoint; sd loads whole SD v1.x checkpoints only")
    if {"string_to_param", "emb_params", "clip_l", "clip_g"} & set(keys) or (
        0 < len(keys) <= 4 and all(torch.is_tensor(v) and v.ndim <= 2 and "." not in k for k, v in state.items())
    ):
        raise CheckpointError(f"{path}: a textual-inversion embedding, not a checkpoint")
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in keys):
        raise CheckpointError(f"{path}: an SDXL checkpoint; sd runs SD v1.x only")
    context = state.get("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or (context is not None and context.shape[1] == 1024):
        raise CheckpointError(
            f"{path}: an SD 2.x checkpoint (OpenCLIP text encoder, 1024-wide context); sd runs SD v1.x only"
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "single-file"
    if metadata.get("format") == NATIVE_FORMAT:
        return "native"
    if any(k.startswith(("encoder.conv_in.", "first_stage_model.encoder.")) for k in keys):
        raise CheckpointError(
            f"{path}: a VAE-only file; load it with vae={str(path)!r} (--vae) next to a full SD v1.x checkpoint"
        )
    if "down_blocks.0.resnets.0.norm1.weight" in state or "text_model.embeddings.token_embedding.weight" in state:
        raise CheckpointError(
            f"{path}: one network of a diffusers folder; pass the folder holding unet/, vae/, text_encoder/"
        )
    raise CheckpointError(f"{path}: no Stable Diffusion weights in this file (keys such as {name_keys(keys, 3)})")


# -- diffusers folders and VAE files ------------------------------------------------------------------------------


WEIGHT_FILES = {
    "unet": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "vae": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    sub = folder / name
    weights = next((sub / f for f in WEIGHT_FILES[name] if (sub / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no {name} weights (expected {sub}/{WEIGHT_FILES[name][0]} or .bin)")
    return read_checkpoint(weights)[0]


def read_diffusers_folder(folder: Path) -> tuple[dict[str, dict], dict, Tokenizer]:
    """A diffusers-format SD folder -> (components in our names, config hints, its tokenizer)."""
    pipeline = read_json(folder / "model_index.json").get("_class_name", "")
    unet_config = read_json(folder / "unet" / "config.json")
    context = unet_config.get("cross_attention_dim")
    if "XL" in pipeline or context == 2048 or unet_config.get("addition_embed_type"):
        raise CheckpointError(f"{folder}: an SDXL diffusers folder; sd runs SD v1.x only")
    if unet_config.get("use_linear_projection") or context == 1024:
        raise CheckpointError(f"{folder}: an SD 2.x diffusers folder (1024-wide context); sd runs SD v1.x only")
    clip, _ = from_transformers_clip(read_weights(folder, "text_encoder"))
    tokenizer_folder = folder / "tokenizer"
    tokenizer = (
        Tokenizer.from_folder(tokenizer_folder) if (tokenizer_folder / "vocab.json").is_file() else default_tokenizer()
    )
    components = {
        "clip": clip,
        **from_diffusers_vae(read_weights(folder, "vae")),
        "diffusion": from_diffusers_unet(read_weights(folder, "unet")),
    }
    hints = {
        "unet_heads": unet_config.get("attention_head_dim", 8),
        "clip_heads": read_json(folder / "text_encoder" / "config.json").get("num_attention_heads"),
    }
    return components, hints, tokenizer


def read_vae(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A replacement autoencoder: an LDM-layout VAE file, a diffusers VAE weights file, or a diffusers vae/ folder."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / f for f in WEIGHT_FILES["vae"] if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: a folder without VAE weights (expected {WEIGHT_FILES['vae'][0]} or .bin)")
        path = weights
    state, _ = read_checkpoint(path)
    if "encoder.down_blocks.0.resnets.0.norm1.weight" in state:
        return from_diffusers_vae(state)
    if any(k.startswith("model.diffusion_model.") for k in state):
        raise CheckpointError(
            f"{path}: a full checkpoint, not a VAE file; pass a VAE such as vae-ft-mse-840000-ema-pruned"
        )
    return from_ldm_vae(state)[0]


# -- configs from shapes --------------------------------------------------------------------------------------------


def infer_diffusion_config(state: dict[str, torch.Tensor], heads: int = 8) -> UNetConfig:
    """The UNet's config from its weights' names and shapes; the head count (8 for SD v1) is not in the weights."""
    conv_in = state["input_blocks.0.0.weight"]
    channels = conv_in.shape[0]
    blocks = indices(state, "input_blocks.")
    downsamples = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in state]
    levels = len(downsamples) + 1
    num_res_blocks = (len(blocks) - 1 - len(downsamples)) // levels
    first_of_level = [1 + level * (num_res_blocks + 1) for level in range(levels)]
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=state["out.2.weight"].shape[0],
        channels=channels,
        channel_mult=tuple(
            state[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0] // channels for n in first_of_level
        ),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(f"input_blocks.{n}.1.proj_in.weight" in state for n in first_of_level),
        heads=heads,
        transformer_depth=len(indices(state, "middle_block.1.transformer_blocks.")),
        context_dim=state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
    )


def infer_vae_config(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> VAEConfig:
    conv_in = encoder["conv_in.weight"]
    channels = conv_in.shape[0]
    return VAEConfig(
        image_channels=conv_in.shape[1],
        latent_channels=decoder["post_quant_conv.weight"].shape[0],
        channels=channels,
        channel_mult=tuple(
            encoder[f"down.{i}.block.0.conv1.weight"].shape[0] // channels for i in indices(encoder, "down.")
        ),
        num_res_blocks=len(indices(encoder, "down.0.block.")),
    )


def infer_clip_config(state: dict[str, torch.Tensor], heads: int | None = None) -> CLIPConfig:
    vocab_size, width = state["embeddings.token_embedding.weight"].shape
    return CLIPConfig(
        vocab_size=vocab_size,
        max_positions=state["embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=len(indices(state, "encoder.layers.")),
        heads=heads or max(1, width // 64),  # CLIP's heads are 64 wide; the weights cannot say how many there are
        mlp_width=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


# -- building the networks ----------------------------------------------------------------------------------------


def build(components: dict[str, dict], configs: dict, device, dtype) -> dict[str, torch.nn.Module]:
    """Networks for `configs`, built empty, adopting the components' tensors in `dtype` on `device`."""
    try:
        with empty_modules():
            nets = networks(configs)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as error:
        raise CheckpointError(f"the configs {configs} describe no network ({error})") from None
    for name, net in nets.items():
        if wrong := [f"{k} ({v.dtype})" for k, v in components[name].items() if not v.is_floating_point()]:
            raise CheckpointError(
                f"the {name} weights hold non-float tensors: {name_keys(wrong, 3)}; SD v1 weights are float32, "
                "float16 or bfloat16"
            )
        state = {k: v.to(device=device, dtype=dtype) for k, v in components[name].items()}
        load_component(net, state, name)
        net.eval()
    return nets


@contextlib.contextmanager
def empty_modules():
    """Builds modules on the meta device with their initialisers switched off: their weights are about to be
    replaced, and initialising meta tensors makes torch import its compiler stack (a noticeable part of loading)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_component(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Strictly loads `state` into `module`, adopting its tensors (no copy; the module takes their dtype)."""
    expected = module.state_dict()
    problems = []
    if missing := [k for k in expected if k not in state]:
        problems.append(f"missing {name_keys(missing)}")
    if unexpected := [k for k in state if k not in expected]:
        problems.append(f"unexpected {name_keys(unexpected)}")
    if reshaped := [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]:
        problems.append(f"wrong shape {name_keys(reshaped, 3)}")
    if problems:
        raise CheckpointError(f"the {name} weights do not fit the {name} network: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True, assign=True)


def sha256(path: str | Path, offset: int = 0) -> str:
    """Of a file from byte `offset` on (A1111's "Model hash" is the whole file's first 10 hex digits); of a folder,
    over its files' relative names and contents in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            f.seek(offset)
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
