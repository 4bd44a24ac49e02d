"""Converts any SD v1.x checkpoint sd can load into sd's native .safetensors file.

    python convert_weights.py IN OUT [--dtype fp16|bf16|fp32] [--ema] [--vae FILE] [--force]
                                     [--layout native|single-file]

IN is a single-file checkpoint (.safetensors/.ckpt), a diffusers folder, or a native file. OUT holds our module
names and, in its metadata, the networks' configs, the dtype and the source's sha256, so loading it needs neither
conversion nor guesswork; `--layout single-file` writes the public single-file keys instead (as v1-5-pruned-emaonly
has them), for other tools. OUT is never overwritten without --force, and is written to a temporary file renamed into
place, so an interrupted run leaves nothing half-written.
"""

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from sd.cli import check_readable
from sd.files import save_atomically
from sd.model_converter import to_ldm, to_native
from sd.model_loader import load_models, sha256
from sd.models import CheckpointError, Models
from sd.native import native_metadata

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def report(models: Models, dtype: str, out: Path) -> str:
    lines = [f"{models.source} ({models.format}) -> {out} ({dtype})", ""]
    for name, net in models.named().items():
        lines.append(f"  {name:<10} {type(net).__name__:<8} {sum(p.numel() for p in net.parameters()):>14,} parameters")
    if models.ignored:
        lines += ["", f"  {len(models.ignored)} keys not needed, ignored:"]
        lines += [f"    {count:>4}  {reason}" for reason, count in Counter(models.ignored.values()).items()]
    return "\n".join(lines)


def convert(
    source: Path, out: Path, dtype: str = "fp16", ema: bool = False, vae: Path | None = None, layout: str = "native"
) -> Models:
    """Writes OUT atomically: a temporary file next to it, renamed into place once complete."""
    models = load_models(source, dtype=DTYPES[dtype], ema=ema, vae=vae)
    components = {name: net.state_dict() for name, net in models.named().items()}
    state = to_native(components) if layout == "native" else to_ldm(components)
    state = {k: v.contiguous() for k, v in state.items()}
    extra = {"dtype": dtype, "source": source.name, "source_sha256": sha256(source), "source_format": models.format}
    if vae is not None:
        extra |= {"vae": Path(vae).name, "vae_sha256": sha256(Path(vae))}
    metadata = (
        native_metadata(models, **extra) if layout == "native" else {"image_size": str(models.image_size), **extra}
    )
    save_atomically(state, out, metadata)
    return models


def check_paths(args: argparse.Namespace) -> None:
    """Everything about IN, OUT and --vae that can be checked before the (long) conversion starts."""
    for flag, path in (("IN", args.source), ("--vae", args.vae)):
        if path is not None:
            check_readable(flag, path)
    if args.out.is_dir():
        raise ValueError(f"OUT {args.out} is a folder; name the file to write, such as {args.out}/model.safetensors")
    if args.out.exists() and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it")
    if args.out.exists() and args.out.resolve() == args.source.resolve():
        raise ValueError("OUT is the source checkpoint; write the native file elsewhere")
    folder = args.out.parent
    if not folder.is_dir():
        raise ValueError(f"OUT's folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"OUT's folder {folder} is not writable; write elsewhere")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="SD v1.x checkpoint: .safetensors, .ckpt, diffusers folder")
    parser.add_argument("out", type=Path, help="the native .safetensors file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="weights' dtype in OUT (default fp16)")
    parser.add_argument("--ema", action="store_true", help="take the UNet's EMA copy from a full training file")
    parser.add_argument("--vae", type=Path, help="replace the autoencoder with this VAE file or diffusers vae/ folder")
    parser.add_argument("--layout", choices=["native", "single-file"], default="native", help="OUT's key layout")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)

    try:
        check_paths(args)
        models = convert(args.source, args.out, args.dtype, args.ema, args.vae, args.layout)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk filled up or the folder went away while writing
        print(f"error: writing {args.out}: {error.strerror}; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(report(models, args.dtype, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
