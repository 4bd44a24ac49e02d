"""Memory of large VAE decodes with the full SD v1.5 decoder: whole, and in tiles (pipeline.decode's `tile`).

    python bench/memory.py [--sizes 1024 2048] [--tile 512]

Each decode runs in its own process (seeded random weights in the public layout, fp32 on the CPU) and reports its
time and the process's peak RSS. Decoding 2048x2048 whole is left out on machines with less than 32 GiB of memory.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "data")]

from common import peak_rss_gib, write_table  # noqa: E402


def worker(size: int, tile: int | None) -> dict:
    from types import SimpleNamespace

    from reference import public_key_shapes, random_checkpoint

    from sd.decoder import Decoder
    from sd.encoder import Encoder
    from sd.model_converter import from_ldm
    from sd.model_loader import load_component
    from sd.pipeline import decode

    vae_keys = {k: v for k, v in public_key_shapes().items() if k.startswith("first_stage_model.")}
    components, _ = from_ldm(random_checkpoint(vae_keys))
    vae = SimpleNamespace(encoder=Encoder(), decoder=Decoder())  # what decode() reads
    for name in ("encoder", "decoder"):
        load_component(getattr(vae, name), components[name], name)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    before = peak_rss_gib()
    start = time.perf_counter()
    with torch.inference_mode():
        image = decode(vae, latents, tile=tile)
    assert image.shape[-1] == size
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gib(), "weights_rss_gb": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, tile = int(args.worker[0]), None if args.worker[1] == "none" else int(args.worker[1])
        print(json.dumps(worker(size, tile)))
        return
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows = []
    for size in args.sizes:
        for tile in (None, args.tile):
            if tile is None and size >= 2048 and memory_gib < 32:
                rows.append(
                    [f"{size}x{size}", "whole", "skipped", f"needs more than this machine's {memory_gib:.0f} GiB", ""]
                )
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(size), str(tile or "none")],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                [
                    f"{size}x{size}",
                    f"tiles of {tile}" if tile else "whole",
                    f"{r['seconds']:.1f}",
                    f"{r['peak_rss_gb']:.2f}",
                    f"{r['peak_rss_gb'] - r['weights_rss_gb']:.2f}",
                ]
            )
    write_table(
        "memory",
        "VAE decode of large images, full SD v1.5 decoder, CPU fp32",
        ["image", "decode", "seconds", "peak RSS GiB", "of which decoding GiB"],
        rows,
        [
            "Peak RSS includes the process (torch, the VAE's weights); 'decoding' subtracts what it",
            "held before decoding. Tiles overlap by a quarter tile and are blended linearly.",
        ],
    )


if __name__ == "__main__":
    main()
