"""sd's own checkpoint file (written by convert_weights.py and sd.train): a .safetensors file whose keys are our
module names (`<component>.<key>`, see model_converter.to_native) and whose metadata holds the networks' configs, so
loading it needs neither conversion nor guesswork.
"""

import dataclasses
import json
from pathlib import Path

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


def configs_from_metadata(metadata: dict[str, str], path: Path) -> dict[str, object]:
    """The configs a native file records, by component name ({} where it records none); corrupt ones are refused."""
    try:
        saved = json.loads(metadata.get("configs", "{}"))
        saved = {OLD_NAMES.get(name, name): values for name, values in saved.items()}
        if unknown := set(saved) - set(CONFIG_CLASSES):
            raise ValueError(f"configs of unknown networks: {', '.join(sorted(unknown))}")
        configs = {name: config_from_dict(CONFIG_CLASSES[name], values) for name, values in saved.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: corrupt config metadata ({error}); convert the source again") from None
    return configs


def config_from_dict(cls, values: dict):
    """A config dataclass from JSON, lists back to tuples; every count must be a positive whole number."""
    config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if item.type is int or item.type == tuple[int, ...]:
            if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in numbers):
                raise ValueError(f"{cls.__name__}.{item.name} must be positive whole numbers, got {value!r}")
    return config
