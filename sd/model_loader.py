"""Reads a checkpoint file safely, works out the networks' configs from its shapes, and builds the networks.

Networks are built on the meta device and then adopt the file's tensors (memory-mapped where the format allows),
so loading never holds two copies of the weights.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from sd.clip import CLIP, CLIPConfig
from sd.decoder import Decoder
from sd.diffusion import UNet, UNetConfig
from sd.encoder import Encoder, VAEConfig
from sd.model_converter import CheckpointError, from_ldm, load_component


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a .safetensors file or a .ckpt/.pt pickle, told apart by content, not name.

    Pickles are read with torch's weights-only unpickler: a file that would run code is refused, never run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass the path of an SD v1.x checkpoint")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable safetensors file ({error}); is it truncated?") from error
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=head[:4] == b"PK\x03\x04")
        except Exception as error:
            raise CheckpointError(f"{path}: not a loadable checkpoint ({str(error).splitlines()[0]})") from error
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return state
    raise CheckpointError(f"{path}: neither a safetensors file nor a PyTorch checkpoint")


def _indices(keys, prefix: str) -> list[int]:
    """The distinct integers n of keys that start with `prefix` + "n.", sorted."""
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def infer_unet_config(state: dict[str, torch.Tensor]) -> UNetConfig:
    conv_in = state["input_blocks.0.0.weight"]
    channels = conv_in.shape[0]
    blocks = _indices(state, "input_blocks.")
    downsamples = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in state]
    levels = len(downsamples) + 1
    num_res_blocks = (len(blocks) - 1 - len(downsamples)) // levels
    first_of_level = [1 + level * (num_res_blocks + 1) for level in range(levels)]
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=state["out.2.weight"].shape[0],
        channels=channels,
        channel_mult=tuple(state[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0] // channels for n in first_of_level),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(f"input_blocks.{n}.1.proj_in.weight" in state for n in first_of_level),
        transformer_depth=len(_indices(state, "middle_block.1.transformer_blocks.")),
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
            encoder[f"down.{i}.block.0.conv1.weight"].shape[0] // channels for i in _indices(encoder, "down.")
        ),
        num_res_blocks=len(_indices(encoder, "down.0.block.")),
    )


def infer_clip_config(state: dict[str, torch.Tensor]) -> CLIPConfig:
    vocab_size, width = state["embeddings.token_embedding.weight"].shape
    return CLIPConfig(
        vocab_size=vocab_size,
        max_positions=state["embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=len(_indices(state, "encoder.layers.")),
        heads=max(1, width // 64),  # CLIP's heads are 64 wide; the file cannot say how many there are
        mlp_width=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


@dataclass
class Models:
    """The networks of one SD v1.x checkpoint; each carries its config as `.cfg`."""

    clip: CLIP
    encoder: Encoder
    decoder: Decoder
    diffusion: UNet
    source: str

    def named(self) -> dict[str, torch.nn.Module]:
        return {"clip": self.clip, "encoder": self.encoder, "decoder": self.decoder, "diffusion": self.diffusion}


def load_models(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Models:
    """Builds the four networks of a single-file SD v1.x checkpoint, in `dtype` on `device`, in eval mode."""
    components, _ = from_ldm(read_checkpoint(path))
    missing = [c for c in ("clip", "encoder", "decoder", "diffusion") if c not in components]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing)} weights in this file; pass a full SD v1.x checkpoint")
    vae_cfg = infer_vae_config(components["encoder"], components["decoder"])
    with torch.device("meta"):
        nets = {
            "clip": CLIP(infer_clip_config(components["clip"])),
            "encoder": Encoder(vae_cfg),
            "decoder": Decoder(vae_cfg),
            "diffusion": UNet(infer_unet_config(components["diffusion"])),
        }
    for name, net in nets.items():
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in components[name].items()}
        load_component(net, state, name)
        net.eval()
    return Models(**nets, source=str(path))
