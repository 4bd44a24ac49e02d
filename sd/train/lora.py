"""LoRA training: trainable low-rank adapters on the layers of a frozen model, and their export as a kohya-format
LoRA file (what A1111, kohya's scripts, diffusers' `load_lora_weights` and `sd.lora.load_lora` read).

An adapter adds (alpha / rank) * up(down(x)) to its layer's output; `down` starts random and `up` at zero, so
training starts from the unchanged model (as kohya's and PEFT's LoRA do). The adapters run as a runtime-mode
`sd.lora.LoRA` whose matrices are the adapters' Parameters.
"""

import json
import math
import re

import torch
from torch import nn

from sd.diffusion import SpatialTransformer
from sd.files import save_atomically
from sd.lora import Layer, LoRA, diffusers_path
from sd.model_converter import unet_prefixes
from sd.models import Models

TARGETS = {
    "attn": "the attention projections (to_q, to_k, to_v, to_out.0: diffusers' LoRA training script)",
    "attn+ff": "every Linear and 1x1 Conv of the spatial transformers (kohya's LoRA: attention, feed-forward, "
    "proj_in, proj_out)",
    "all": "every Linear and Conv of the UNet (kohya's LoCon: also ResNets, samplers, time embedding, conv_in/out)",
}
ATTENTION = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)$")


def unet_targets(models: Models, targets: str) -> list[str]:
    """Our UNet module paths that `targets` (a key of TARGETS) names."""
    if targets not in TARGETS:
        raise ValueError(f"LoRA targets are one of {', '.join(TARGETS)}; got {targets!r}")
    unet = models.diffusion
    layers = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if targets == "all":
        return layers
    if targets == "attn":
        return [p for p in layers if ATTENTION.search(p)]
    inside = [p + "." for p, m in unet.named_modules() if isinstance(m, SpatialTransformer)]
    one_by_one = lambda m: isinstance(m, nn.Linear) or m.weight.shape[2:] == (1, 1)
    return [p for p in layers if p.startswith(tuple(inside)) and one_by_one(unet.get_submodule(p))]


class Adapter(nn.Module):
    """The trainable pair of one layer: down [rank, in] and up [out, rank] for a Linear, down [rank, in, kh, kw] and
    up [out, rank, 1, 1] for a Conv (LoCon)."""

    def __init__(self, layer: nn.Module, rank: int, generator: torch.Generator):
        super().__init__()
        out, *rest = layer.weight.shape
        kernel = tuple(layer.weight.shape[2:])
        down = nn.init.kaiming_uniform_(torch.empty(rank, *rest), a=math.sqrt(5), generator=generator)  # as PEFT's A
        self.down = nn.Parameter(down.to(layer.weight))
        self.up = nn.Parameter(torch.zeros(out, rank, *(1,) * len(kernel)).to(layer.weight))


class Adapters(nn.Module):
    """Adapters on the `targets` layers of the UNet (and on every Linear of the text encoder's layers, with
    text_encoder), keyed by their kohya names (`lora_unet_down_blocks_0_attentions_0_..._to_q`), attached to
    `models` while they live. The `down` matrices are drawn from a generator seeded with `seed`."""

    def __init__(
        self, models: Models, rank: int, alpha: float | None, targets: str, text_encoder: bool = False, seed: int = 0
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"the LoRA rank is a positive whole number; got {rank}")
        self.rank, self.alpha, self.targets = rank, float(alpha or rank), targets
        cfg = models.diffusion.cfg
        pairs = unet_prefixes(len(cfg.channel_mult), cfg.num_res_blocks, list(cfg.attention_levels))
        names = {("diffusion", p): "lora_unet_" + diffusers_path(p, pairs) for p in unet_targets(models, targets)}
        if text_encoder:
            te = [p for p, m in models.clip.named_modules() if isinstance(m, nn.Linear) and p.startswith("encoder.")]
            names |= {("clip", p): "lora_te_text_model_" + p for p in te}
        names = {key: name.replace(".", "_") for key, name in names.items()}  # kohya's names: no dots
        nets = {"diffusion": models.diffusion, "clip": models.clip}
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict()
        adapted = []
        for (network, path), name in names.items():
            module = nets[network].get_submodule(path)
            adapter = self.layers[name] = Adapter(module, rank, generator)
            adapted.append(Layer(network, path, module, adapter.down, adapter.up, self.alpha / rank))
        self.lora = LoRA(models, adapted, "runtime", 1.0, 1.0)
        self.lora.attach()
        models.loras.append(self.lora)

    def detach(self) -> None:
        """Takes the adapters out of the model."""
        self.lora.remove()

    def state(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """kohya's keys: NAME.lora_down.weight, NAME.lora_up.weight and NAME.alpha for every adapter."""
        state = {}
        for name, adapter in self.layers.items():
            state[f"{name}.lora_down.weight"] = adapter.down.detach().to(dtype).contiguous()
            state[f"{name}.lora_up.weight"] = adapter.up.detach().to(dtype).contiguous()
            state[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return state

    def metadata(self, command: str) -> dict[str, str]:
        """kohya's `ss_` metadata that A1111 and other tools show, and the command that trained the file."""
        convs = self.targets == "all"
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": f"{self.alpha:g}",
            "ss_network_args": json.dumps({"conv_dim": self.rank, "conv_alpha": self.alpha} if convs else {}),
            "ss_base_model_version": "sd_v1",
            "sd_lora_targets": self.targets,
            "command": command,
        }

    def save(self, path, command: str, dtype: torch.dtype = torch.float16) -> None:
        save_atomically(self.state(dtype), path, self.metadata(command))
