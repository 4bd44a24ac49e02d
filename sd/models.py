"""What a Stable Diffusion v1.x model is once loaded: the tokenizer and the four networks (`Models`), their configs,
and the error every checkpoint problem raises. The file readers (`sd/model_loader.py`) fill these; everything else
(the pipeline, the CLI, training) only uses them.
"""

from dataclasses import dataclass, field

import torch

from sd.autoencoder import VAEConfig
from sd.clip import CLIP, CLIPConfig
from sd.decoder import Decoder
from sd.diffusion import UNet, UNetConfig
from sd.encoder import Encoder
from sd.tokenizer import Tokenizer

# The networks' configs by the names Models and the native file's metadata use ("vae" is the encoder's and the
# decoder's). The defaults are SD v1.5's.
SD_V1_CONFIGS = {"clip": CLIPConfig(), "vae": VAEConfig(), "diffusion": UNetConfig()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be mapped onto our modules; the message names the file or keys and what to do."""


def check_device(device: torch.device) -> None:
    """A ValueError for a device this machine does not have."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device on this machine; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: no Apple GPU on this machine; use 'cpu'")


def networks(configs: dict) -> dict[str, torch.nn.Module]:
    """The four networks for `configs` (as SD_V1_CONFIGS), freshly initialised, by their component names."""
    return {
        "clip": CLIP(configs["clip"]),
        "encoder": Encoder(configs["vae"]),
        "decoder": Decoder(configs["vae"]),
        "diffusion": UNet(configs["diffusion"]),
    }


@dataclass
class Models:
    """The tokenizer and networks of one SD v1.x checkpoint; each network carries its config as `.cfg`."""

    tokenizer: Tokenizer
    clip: CLIP
    encoder: Encoder
    decoder: Decoder
    diffusion: UNet
    source: str
    format: str
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint keys not loaded -> why
    image_size: int = 512  # the side the model was trained at, which the demo draws by default
    command: str = ""  # the sd.train command(s) that made one of our native files, from its metadata
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # textual inversion: trigger -> [n, width]
    loras: list = field(default_factory=list)  # the LoRAs applied (sd/lora.py), in the order they were loaded

    def named(self) -> dict[str, torch.nn.Module]:
        return {"clip": self.clip, "encoder": self.encoder, "decoder": self.decoder, "diffusion": self.diffusion}

    @property
    def configs(self) -> dict[str, object]:
        return {"clip": self.clip.cfg, "vae": self.encoder.cfg, "diffusion": self.diffusion.cfg}

    @property
    def device(self) -> torch.device:
        """Where the UNet is, and so where generation computes unless told otherwise."""
        return next(self.diffusion.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.diffusion.parameters()).dtype
