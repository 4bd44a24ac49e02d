"""Textual-inversion embeddings: learned input vectors for CLIP, used in a prompt by a trigger word.

Read from A1111's `.pt` (`string_to_param`, through the weights-only unpickler) and `.safetensors` (`emb_params`, or
a single tensor), and diffusers' `learned_embeds.bin` / `.safetensors` (`{token: vector}`). As in A1111 the trigger
word is the file's name (`charturner.pt` -> "charturner") unless one is given; an n-vector embedding takes n of a
chunk's 75 token slots.
"""

from pathlib import Path

import torch

from sd.model_loader import read_checkpoint
from sd.models import CheckpointError, Models

SUFFIXES = (".pt", ".bin", ".safetensors")


def load_embeddings(models: Models, path: str | Path, name: str | None = None) -> list[str]:
    """Loads one embedding file, or every one in a folder, into `models`; returns their trigger words."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        return [load_embeddings(models, file)[0] for file in files]
    vectors = read_embedding(path)
    width = models.clip.cfg.width
    if vectors.shape[-1] != width:
        raise CheckpointError(
            f"{path}: an embedding {vectors.shape[-1]} wide; this model's CLIP takes {width} (SD 2 and SDXL "
            "embeddings do not fit SD v1)"
        )
    trigger = name or path.stem
    models.embeddings[trigger] = vectors.float()
    return [trigger]


def read_embedding(path: Path) -> torch.Tensor:
    """The [n, width] vectors of an embedding file in any of the three layouts."""
    state, _ = read_checkpoint(path)
    if isinstance(state.get("string_to_param"), dict):  # A1111 .pt
        vectors = next(iter(state["string_to_param"].values()))
    elif "emb_params" in state:  # A1111 .safetensors
        vectors = state["emb_params"]
    elif len(state) == 1:  # diffusers {token: vector}, or a file of one tensor
        vectors = next(iter(state.values()))
    else:
        raise CheckpointError(f"{path}: not a textual-inversion embedding (keys {', '.join(list(state)[:5])})")
    if not torch.is_tensor(vectors) or not vectors.is_floating_point() or vectors.ndim not in (1, 2):
        raise CheckpointError(f"{path}: not a textual-inversion embedding (no [n, width] float tensor)")
    return vectors.detach().reshape(-1, vectors.shape[-1])
