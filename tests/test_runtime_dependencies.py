"""`sd` runs on torch, numpy, pillow, tqdm and safetensors alone: the reference libraries are for tests only."""

import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("diffusers", "transformers", "huggingface_hub", "open_clip", "accelerate")

SCRIPT = f"""
import importlib, pkgutil, sys
FORBIDDEN = {FORBIDDEN!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"sd imported {{name}}")

sys.meta_path.insert(0, Refuse())
import torch
import sd
for module in pkgutil.walk_packages(sd.__path__, "sd."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)

from sd.clip import CLIP, CLIPConfig
from sd.decoder import Decoder
from sd.diffusion import UNet, UNetConfig
from sd.encoder import Encoder, VAEConfig

with torch.no_grad():
    context = CLIP(CLIPConfig.tiny())(torch.zeros(1, 77, dtype=torch.long))
    mean, logvar = Encoder(VAEConfig.tiny())(torch.zeros(1, 3, 64, 64))
    eps = UNet(UNetConfig.tiny())(mean, torch.tensor([1]), context)
    image = Decoder(VAEConfig.tiny())(eps)
assert image.shape == (1, 3, 64, 64), image.shape
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
assert not loaded, loaded
print("ok")
"""


def test_sd_builds_and_runs_every_network_without_the_reference_libraries():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_sd_sources_never_import_the_reference_libraries():
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted((Path(__file__).parents[1] / "sd").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip().startswith(("import ", "from ")) and line.split()[1].split(".")[0] in FORBIDDEN
    ]
    assert not offenders, offenders
