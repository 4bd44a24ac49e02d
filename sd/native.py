"""sd's own checkpoint file (written by convert_weights.py and sd.train): a .safetensors file whose keys are our
module names (`<component>.<key>`, see model_converter.to_native) and whose metadata holds the networks' configs, so
loading it needs neither conversion nor guesswork. Also: writing any .safetensors file whole or not at all.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.models import CheckpointError, Models

NATIVE_FORMAT = "sd-native-v1"
CONFIG_CLASSES = {"clip": CLIPConfig, "vae": VAEConfig, "diffusion": UNetConfig}
OLD_NAMES = {"unet": "diffusion"}  # files written before the UNet's config was named after its component


def native_metadata(models: Models, **extra: str) -> dict[str, str]:
    """The safetensors metadata of our native format: the configs, so loading needs no inference."""
    configs = {name: dataclasses.asdict(cfg) for name, cfg in models.configs.items()}
    return {"format": NATIVE_FORMAT, "configs": json.dumps(configs), "image_size": str(models.image_size), **extra}


def configs_from_metadata(metadata: dict[str, str]) -> dict[str, object]:
    """The configs a native file records, by component name ({} where it records none)."""
    saved = json.loads(metadata.get("configs", "{}"))
    saved = {OLD_NAMES.get(name, name): values for name, values in saved.items()}
    if unknown := set(saved) - set(CONFIG_CLASSES):
        raise CheckpointError(f"native file records configs of unknown networks: {', '.join(sorted(unknown))}")
    return {name: config_from_dict(CONFIG_CLASSES[name], values) for name, values in saved.items()}


def config_from_dict(cls, values: dict):
    """A config dataclass from JSON, lists back to tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def new_file_mode() -> int:
    """The permission bits a newly created file gets: 0666 less the umask (which can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomically(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Writes a .safetensors file whole or not at all: into a temporary file beside it, renamed into place once
    complete. safetensors creates its files readable by their owner alone; this one gets new_file_mode()."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
