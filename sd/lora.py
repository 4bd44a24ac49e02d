"""LoRA: a low-rank update W + strength * (alpha / rank) * up @ down of chosen Linear and Conv layers, loaded from
the files people share, applied and removed.

    lora = load_lora(models, "style.safetensors", strength=0.8)   # merged into the weights (the default)
    lora.remove()                                                 # the original weights back: the same tensors
    lora = load_lora(models, path, mode="runtime")                # added on the fly; the weights stay untouched
    lora.set_strength(0.5)

Layers are found by name through one table built from our module tree (`layer_names`): each of our Linear and Conv
layers under every name a LoRA file may give it: kohya's `lora_unet_<diffusers path>` and `lora_unet_<our LDM
path>` (dots as underscores), `lora_te_text_model_<path>`, and diffusers' / PEFT's `unet.<diffusers path>`,
`text_encoder.<path>`. Every key of a file is used or reported with the reason it was skipped.
"""

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sd.model_converter import unet_prefixes
from sd.model_loader import read_checkpoint, sha256
from sd.models import CheckpointError, Models

# how each format names a layer's down and up matrices and its alpha; the first matching ending wins
PARTS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' old attention-processor LoRAs name the projection inside the processor
PROCESSOR = {
    "processor.to_q_lora": "to_q",
    "processor.to_k_lora": "to_k",
    "processor.to_v_lora": "to_v",
    "processor.to_out_lora": "to_out.0",
}
NOT_LORA = {"hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr"}


def layer_names(models: Models) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give one of our layers -> (network, our module path)."""
    cfg = models.diffusion.cfg
    pairs = unet_prefixes(len(cfg.channel_mult), cfg.num_res_blocks, list(cfg.attention_levels))
    names = {}
    for path, module in models.diffusion.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for alias in (path, diffusers_path(path, pairs)):
                names["lora_unet_" + alias.replace(".", "_")] = ("diffusion", path)
                names["unet." + alias] = ("diffusion", path)
    for path, module in models.clip.named_modules():
        if isinstance(module, nn.Linear):
            names["lora_te_text_model_" + path.replace(".", "_")] = ("clip", path)
            names["text_encoder.text_model." + path] = ("clip", path)
            names["text_encoder." + path] = ("clip", path)
    return names


def diffusers_path(path: str, pairs: list[tuple[str, str, dict | None]]) -> str:
    """Our UNet module path -> diffusers' (the converter's prefix table, read backwards)."""
    dotted = path + "."
    theirs, ours, leaves = max((p for p in pairs if dotted.startswith(p[1])), key=lambda p: len(p[1]))
    rest = dotted[len(ours) :].rstrip(".")
    if leaves is not None:
        rest = {our: their for their, our in leaves.items()}.get(rest, rest)
    return (theirs + rest).rstrip(".")


@dataclass
class Layer:
    network: str  # "diffusion" or "clip"
    path: str  # the module's name in its network
    module: nn.Module
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    scale: float  # alpha / rank

    def delta(self) -> torch.Tensor:
        """up @ down in the layer weight's shape, float32."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return (up @ down).reshape(self.module.weight.shape)


@dataclass(eq=False)  # compared by identity: models.loras holds each once
class LoRA:
    """A loaded LoRA: `remove()` takes it out again; in runtime mode `set_strength` changes it between calls."""

    models: Models
    layers: list[Layer]
    mode: str
    strength: float
    te_strength: float
    skipped: dict[str, str] = field(default_factory=dict)  # file keys not used -> why
    originals: list[nn.Parameter] = field(default_factory=list)  # merged: the weights as they were
    hooks: list = field(default_factory=list)

    def factor(self, layer: Layer) -> float:
        return layer.scale * (self.te_strength if layer.network == "clip" else self.strength)

    def merge(self) -> None:
        """Each layer gets a new weight W + dW; the original Parameter is kept as it is, to be put back."""
        with torch.no_grad():
            for layer in self.layers:
                weight = layer.module.weight
                self.originals.append(weight)
                up, down = layer.up.flatten(1).float(), layer.down.flatten(1).float()
                merged = torch.addmm(weight.float().flatten(1), up, down, alpha=self.factor(layer))
                layer.module.weight = nn.Parameter(merged.view(weight.shape).to(weight), weight.requires_grad)

    def attach(self) -> None:
        for layer in self.layers:
            self.hooks.append(layer.module.register_forward_hook(self.runtime_output(layer)))

    def runtime_output(self, layer: Layer):
        conv = isinstance(layer.module, nn.Conv2d)

        def hook(module, inputs, output):
            (x,) = inputs
            down, up = layer.down.to(x), layer.up.to(x)
            if conv:
                kernel = module.weight.shape[2:]
                down = down.reshape(down.shape[0], module.in_channels, *kernel)  # [rank, in, kh, kw]
                low = F.conv2d(x, down, stride=module.stride, padding=module.padding)
                return output + self.factor(layer) * F.conv2d(low, up.reshape(*up.shape[:2], 1, 1))
            return output + self.factor(layer) * F.linear(F.linear(x, down.flatten(1)), up.flatten(1))

        return hook

    def set_strength(self, strength: float, te_strength: float | None = None) -> None:
        if self.mode != "runtime":
            raise ValueError("a merged LoRA's strength is fixed; load it with mode='runtime' to change it")
        self.strength, self.te_strength = strength, strength if te_strength is None else te_strength

    def remove(self) -> None:
        if self not in self.models.loras:
            return
        if self.mode == "merge":
            later = self.models.loras[self.models.loras.index(self) + 1 :]
            if any(lora.mode == "merge" for lora in later):
                raise ValueError("remove merged LoRAs in the reverse order of loading")
            for layer, original in zip(self.layers, self.originals):
                layer.module.weight = original
        for hook in self.hooks:
            hook.remove()
        self.models.loras.remove(self)


def load_lora(
    models: Models,
    path: str | Path,
    strength: float = 1.0,
    te_strength: float | None = None,
    mode: str = "merge",
) -> LoRA:
    """Applies a LoRA file (kohya/A1111 .safetensors or .pt, diffusers/PEFT) to `models`. strength: on the UNet,
    and on the text encoder unless te_strength is given (A1111's <lora:name:te:unet>). mode: "merge" (W += dW) or
    "runtime" (added at each call)."""
    if mode not in ("merge", "runtime"):
        raise ValueError(f"mode must be 'merge' or 'runtime', got {mode!r}")
    layers, skipped = read_lora(models, path)
    lora = LoRA(models, layers, mode, strength, strength if te_strength is None else te_strength, skipped)
    if mode == "merge":
        lora.merge()
    else:
        lora.attach()
    models.loras.append(lora)
    return lora


def read_lora(models: Models, path: str | Path) -> tuple[list[Layer], dict[str, str]]:
    """The layers a LoRA file changes in `models`, and the file's keys it could not place (key -> why)."""
    state, _ = read_checkpoint(path)
    for marker, kind in NOT_LORA.items():
        if any(marker in key for key in state):
            raise CheckpointError(f"{path}: a {kind} file; sd applies LoRA (and LoCon) only")
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in state):
        raise CheckpointError(f"{path}: an SDXL LoRA (it has a second text encoder); sd runs SD v1.x")
    groups, skipped = group_keys(state)
    names = layer_names(models)
    networks = {"diffusion": models.diffusion, "clip": models.clip}
    layers = []
    for name, parts in groups.items():
        if name not in names:
            skipped |= dict.fromkeys(parts["keys"], "no SD v1 layer of that name")
            continue
        if "down" not in parts or "up" not in parts:
            skipped |= dict.fromkeys(parts["keys"], "a down or up matrix without its pair")
            continue
        network, module_path = names[name]
        module = networks[network].get_submodule(module_path)
        down, up = parts["down"], parts["up"]
        rank, weight = down.shape[0], module.weight
        if down.ndim == 4 and weight.ndim == 4 and down.shape[1] < weight.shape[1] == 9:
            # an ordinary model's conv_in LoRA on the 9-channel inpainting UNet: the mask and masked-image inputs
            # (channels 4-8) get no update
            down = torch.cat([down, down.new_zeros(rank, weight.shape[1] - down.shape[1], *down.shape[2:])], dim=1)
        if (up.shape[0], down[0].numel(), up.shape[1]) != (weight.shape[0], weight[0].numel(), rank):
            skipped |= dict.fromkeys(parts["keys"], f"shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit")
            continue
        alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
        layers.append(Layer(network, module_path, module, down, up, alpha / rank if alpha else 1.0))
    if not layers:
        raise CheckpointError(f"{path}: no key of this file names an SD v1 layer ({len(skipped)} keys)")
    return layers, skipped


def group_keys(state: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """File keys -> {layer name: {"down", "up", "alpha", "keys"}}, and the keys that are not LoRA parts."""
    groups: dict[str, dict] = {}
    skipped = {}
    for key, tensor in state.items():
        ending, part = next(((e, p) for e, p in PARTS if key.endswith(e)), (None, None))
        if ending is None:
            skipped[key] = "not a LoRA matrix or alpha"
            continue
        name = key[: -len(ending)]
        for theirs, ours in PROCESSOR.items():
            name = name.replace(theirs, ours)
        group = groups.setdefault(name, {"keys": []})
        group[part] = tensor
        group["keys"].append(key)
    return groups, skipped


# -- A1111's prompt tags ----------------------------------------------------------------------------------------------

LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """A prompt without its `<lora:NAME[:TE[:UNET]]>` tags (A1111's: one number is both strengths, `te=`/`unet=`
    name them), and the tags as (name, text-encoder strength, UNet strength)."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        te = unet = None
        positional = []
        for item in match.group(2).split(":")[1:]:
            key, _, value = item.rpartition("=")
            if key in ("te", "unet"):
                te, unet = (float(value), unet) if key == "te" else (te, float(value))
            else:
                positional.append(float(item))
        te = positional[0] if positional and te is None else 1.0 if te is None else te
        unet = positional[1] if len(positional) > 1 and unet is None else te if unet is None else unet
        tags.append((match.group(1), te, unet))
    return LORA_TAG.sub("", prompt), tags


def find_lora(folder: str | Path | None, name: str) -> Path:
    """A tag's file: NAME.safetensors (or .pt, .ckpt) in `folder`."""
    if folder is None:
        raise ValueError(f"the prompt names <lora:{name}>: pass the folder of LoRA files (--lora-dir / lora_dir=)")
    path = next((Path(folder) / (name + s) for s in LORA_SUFFIXES if (Path(folder) / (name + s)).is_file()), None)
    if path is None:
        raise ValueError(f"<lora:{name}>: no {name}.safetensors (.pt, .ckpt) in {folder}")
    return path


def lora_hash(path: Path) -> str:
    """A1111's "Lora hashes" entry: the first 12 hex digits of the sha256 of a .safetensors file's tensor bytes (its
    header skipped: kohya's "addnet" hash, unchanged by edited metadata), or of a whole .pt/.ckpt file."""
    header = 0
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
    return sha256(path, offset=header)[:12]


@contextlib.contextmanager
def prompt_loras(models: Models, tags: list[tuple[str, float, float]], folder: str | Path | None):
    """The tagged LoRAs merged into `models` for the block's duration, then removed (also after an error); yields
    {name: A1111's hash} for the PNG's "Lora hashes"."""
    files = [(name, find_lora(folder, name), te, unet) for name, te, unet in tags]
    loaded = []
    try:
        for _, path, te, unet in files:
            loaded.append(load_lora(models, path, strength=unet, te_strength=te))
        yield {name: lora_hash(path) for name, path, _, _ in files}
    finally:
        for lora in reversed(loaded):
            lora.remove()
