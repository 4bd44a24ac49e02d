"""The command line: `python demo.py "a lighthouse at dusk"` (or `python -m sd ...`), text-to-image and, with
--init-image, image-to-image (with --mask, inpainting). PNGs carry A1111-compatible `parameters` text, file names are
numbered so nothing is ever overwritten, and every file is written whole or not at all. Bad input is one line on
stderr and exit code 2, before anything is loaded or written."""

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sd.attention import set_attention_chunk
from sd.embeddings import load_embeddings
from sd.files import remove_stale_temporaries, temporary_path
from sd.images import check_size, default_size, grid, open_image
from sd.inpainting import MASKED_CONTENT, outpainting
from sd.lora import find_lora, load_lora, lora_tags
from sd.memory import available, check_fits, estimate, peek
from sd.model_loader import DEFAULT_CHECKPOINT, load_models, sha256
from sd.models import CheckpointError
from sd.pipeline import Parameters, generate
from sd.prompts import EMPHASIS, number, split_and
from sd.samplers import SAMPLERS, make_sampler
from sd.sampling import TRAIN_STEPS
from sd.study import HeatMaps, Steps, WordMaps

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line and exit code 2, as for every other bad input (argparse prints its usage first)."""
        self.exit(2, f"error: {message}; see --help\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="demo.py", description="Stable Diffusion v1.x: text-to-image, image-to-image and inpainting.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default="", help="what to steer away from (negative prompt)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps, 1 to 1000 (default 20)")
    p.add_argument(
        "--cfg",
        type=finite,
        default=7.5,
        help="classifier-free guidance scale (default 7.5); 1 or below means no guidance: the prompt's own "
        "prediction, with the negative prompt unused",
    )
    p.add_argument("--seed", type=int, help="random seed, 0 to 2**64 - 1 (default, or -1: a fresh one, printed)")
    p.add_argument("--sampler", default="euler_a", choices=list(SAMPLERS), help="default euler_a")
    p.add_argument("--karras", action="store_true", help="Karras sigma schedule (euler, lms, dpmpp_2m)")
    p.add_argument("--eta", type=finite, default=0.0, help="DDIM's eta (ddim only; default 0)")
    p.add_argument("-W", "--width", type=int, help="multiple of 8 (default: the model's size, 512 for SD v1.x)")
    p.add_argument("-H", "--height", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("--batch", type=int, default=1, help="images to make (one seed, one batch; default 1)")
    p.add_argument("--init-image", type=Path, help="image-to-image: start from this image")
    p.add_argument("--strength", type=finite, default=0.75, help="image-to-image: how much to change, 0..1 (0.75)")
    p.add_argument(
        "--mask",
        type=Path,
        help="inpainting (with --init-image): repaint where this image is white, keep where it is black (resized to "
        "the image); any checkpoint, the 9-channel inpainting ones included",
    )
    p.add_argument(
        "--paste-back",
        action="store_true",
        help="inpainting: put the original pixels back outside the mask (the VAE's round trip changes them slightly)",
    )
    p.add_argument(
        "--mask-blur", type=int, default=0, help="with --paste-back: soften the mask's edge over N pixels (A1111: 4)"
    )
    p.add_argument(
        "--masked-content",
        choices=MASKED_CONTENT,
        default="original",
        help="inpainting below --strength 1: what the masked region starts from (A1111's option; default original)",
    )
    p.add_argument(
        "--outpaint",
        metavar="LEFT,TOP,RIGHT,BOTTOM",
        help="extend the --init-image's canvas by these many pixels on each side and paint the new border "
        "(inpainting with a mask made for it); use --strength 1",
    )
    p.add_argument(
        "--only-masked",
        type=int,
        nargs="?",
        const=32,
        metavar="PADDING",
        help="inpainting: draw only the box around the mask, PADDING pixels wider (default 32), at -W x -H, and paste "
        'it back into the image, which keeps its size (A1111\'s "Only masked")',
    )
    p.add_argument("--clip-skip", type=int, default=1, help="stop CLIP this many layers early, minus one (A1111's)")
    p.add_argument(
        "--emphasis",
        choices=EMPHASIS,
        default="original",
        help="how (word:1.2) weights apply: A1111's original (default), no_norm, or none (brackets are text)",
    )
    p.add_argument(
        "--pad-prompts",
        action="store_true",
        help="pad the shorter of a long prompt and its negative with empty chunks: one UNet call (A1111's "
        "pad_cond_uncond)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA (kohya/A1111 or diffusers file), at STRENGTH (default 1); repeatable",
    )
    p.add_argument("--lora-dir", type=Path, help="where the prompt's <lora:NAME:STRENGTH> tags find NAME.safetensors")
    p.add_argument(
        "--embeddings", type=Path, help="a textual-inversion file, or a folder of them: each file's name triggers it"
    )
    p.add_argument("--ckpt", type=Path, help="SD v1.x checkpoint: .safetensors, .ckpt, diffusers folder, native")
    p.add_argument("--vae", type=Path, help="a replacement VAE file or diffusers vae/ folder")
    p.add_argument("--ema", action="store_true", help="use the EMA UNet of a full training checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: cuda, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: fp16 on CUDA, else fp32")
    p.add_argument("--outdir", type=Path, default=Path("outputs"), help="where PNGs go (default outputs/)")
    study = p.add_argument_group("study (docs/study.md)")
    study.add_argument(
        "--attention-maps",
        action="store_true",
        help="also write a sheet of the image under each prompt word's cross-attention heat map (DAAM)",
    )
    study.add_argument(
        "--save-steps", action="store_true", help="also write each image's steps: noisy latents above, x0-hat below"
    )
    memory = p.add_argument_group("speed and memory")
    memory.add_argument(
        "--low-vram", action="store_true", help="keep idle networks on the CPU, move each in for its turn"
    )
    memory.add_argument(
        "--tile-vae", type=int, nargs="?", const=512, help="VAE in overlapping tiles of this many pixels (512)"
    )
    memory.add_argument("--attention-chunk", type=int, help="attend this many queries at a time (attention slicing)")
    memory.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convolutions")
    memory.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first run, faster after)")
    memory.add_argument(
        "--deepcache",
        metavar="N[,BRANCH]",
        help="DeepCache: the whole UNet every N steps, only skip branch BRANCH (default 0) between (try 3)",
    )
    memory.add_argument(
        "--tome", type=finite, default=0.0, metavar="RATIO", help="token merging: merge this share of tokens (try 0.5)"
    )
    return p.parse_args(argv)


def finite(text: str) -> float:
    """An argparse type: a float that is a number (not inf or nan)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device on this machine; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple GPU on this machine; use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype bf16: this GPU has no bfloat16 arithmetic; use --dtype fp16")
    if dtype != torch.float32 and device.type == "mps":
        try:
            torch.ones(1, device=device, dtype=dtype) * 2
        except (RuntimeError, TypeError):
            raise ValueError(f"--dtype {name}: not supported on this Mac's GPU; use --dtype fp32") from None
    if dtype == torch.float16 and device.type == "cpu":
        print("note: float16 on the CPU is emulated and slow; bf16 (or fp32) is faster there")
    return dtype


def validate(args: argparse.Namespace) -> Image.Image | None:
    """Everything that can be checked before loading a model, so bad input costs nothing and writes nothing.
    Returns the init image, opened."""
    if args.seed == -1:
        args.seed = None  # A1111's "random"
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be between 0 and 2**64 - 1, or -1 for a random one; got {args.seed}")
    check_size(8 if args.width is None else args.width, 8 if args.height is None else args.height)
    if not 0 <= args.strength <= 1:
        raise ValueError(f"--strength must be between 0 and 1, got {args.strength}")
    if args.mask is not None and args.init_image is None:
        raise ValueError("--mask marks what to repaint in an image: add --init-image")
    inpainting = args.paste_back or args.mask_blur or args.only_masked is not None or args.masked_content != "original"
    if inpainting and args.mask is args.outpaint is None:
        raise ValueError(
            "--paste-back, --mask-blur, --only-masked and --masked-content are for inpainting: add --mask (and "
            "--init-image)"
        )
    if args.only_masked is not None and args.only_masked < 0:
        raise ValueError(f"--only-masked's padding is a number of pixels, 0 or more; got {args.only_masked}")
    if args.mask_blur < 0:
        raise ValueError(f"--mask-blur is a number of pixels, 0 or more; got {args.mask_blur}")
    if args.mask_blur and not args.paste_back:
        raise ValueError("--mask-blur softens the edge of --paste-back: add --paste-back")
    if args.attention_maps and (args.batch > 1 or args.only_masked is not None or len(split_and(args.prompt)) > 1):
        raise ValueError(
            "--attention-maps maps the words of one prompt on one whole image: drop --batch, --only-masked, AND"
        )
    if not 1 <= args.steps <= TRAIN_STEPS:
        raise ValueError(f"--steps must be between 1 and {TRAIN_STEPS} (SD v1's training steps), got {args.steps}")
    counts = {"--batch": args.batch, "--clip-skip": args.clip_skip, "--attention-chunk": args.attention_chunk}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    make_sampler(args.sampler, karras=args.karras, eta=args.eta)
    if not 0 <= args.tome <= 0.75:
        raise ValueError(f"--tome is the share of tokens merged, 0 to 0.75; got {args.tome}")
    if args.deepcache is not None:
        parts = [number(part) for part in args.deepcache.split(",")]
        if not 1 <= len(parts) <= 2 or any(p is None or p != int(p) or p < 0 for p in parts) or parts[0] < 1:
            raise ValueError(
                f"--deepcache takes N or N,BRANCH, whole numbers with N >= 1 (try 3); got {args.deepcache}"
            )
        args.deepcache = tuple(int(p) for p in parts) + (0,) * (2 - len(parts))
    if args.tile_vae is not None and (args.tile_vae < 64 or args.tile_vae % 32):
        raise ValueError(f"--tile-vae must be a multiple of 32, at least 64, got {args.tile_vae}")
    check_output_folder(args.outdir)
    args.loras = [lora_argument(text) for text in args.lora]
    for flag, path in (("--ckpt", args.ckpt), ("--vae", args.vae), ("--embeddings", args.embeddings)):
        if path is not None:
            check_readable(flag, path)
    for path, _ in args.loras:
        check_readable("--lora", path)
    for name, _, _ in lora_tags(args.prompt)[1]:
        check_readable("--lora-dir", find_lora(args.lora_dir, name))
    image = None if args.init_image is None else open_image(args.init_image)
    if args.mask is not None:
        args.mask = open_image(args.mask, "mask")
    if args.outpaint is not None:
        if image is None or args.mask is not None:
            raise ValueError("--outpaint extends an --init-image and makes its own mask: give --init-image, no --mask")
        sides = [number(side) for side in args.outpaint.split(",")]
        if len(sides) != 4 or any(side is None or side != int(side) for side in sides):
            raise ValueError(
                f"--outpaint takes four whole numbers of pixels, LEFT,TOP,RIGHT,BOTTOM; got {args.outpaint}"
            )
        image, args.mask = outpainting(image, *(int(side) for side in sides))
    return image


def lora_argument(text: str) -> tuple[Path, float]:
    """FILE or FILE:STRENGTH (a number after the last colon; a path may hold colons of its own)."""
    path, _, strength = text.rpartition(":")
    if path and strength and number(strength) is not None and math.isfinite(number(strength)):
        return Path(path), number(strength)
    return Path(text), 1.0


def check_output_folder(folder: Path) -> None:
    """--outdir must be a folder that can be written into, or created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--outdir {folder}: {existing} is a file, not a folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--outdir {folder}: {existing} is not writable; pass a folder you can write to")


def check_readable(flag: str, path: Path) -> None:
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file or folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ValueError(f"{flag} {path}: not readable; check its permissions")


def check_memory(args: argparse.Namespace, checkpoint: Path, image, device: torch.device, dtype) -> None:
    """Refuses a size or batch whose estimated memory (sd/memory.py) exceeds what the device has free, naming the
    options that would make it fit."""
    widths = peek(checkpoint)
    native = (widths.image_size, widths.image_size)
    width, height = default_size(image, widths.image_size) if image is not None else native
    width, height = args.width or width, args.height or height
    free = available(device)

    def needs(**options) -> dict[str, int]:
        return estimate(widths, width, height, args.batch, args.cfg > 1, dtype, **options)

    current = {"vae_tile": args.tile_vae, "attention_chunk": args.attention_chunk}
    hints = ["draw a smaller size (-W/-H)"] + ["fewer images (--batch)"] * (args.batch > 1)
    for extra in ({"vae_tile": 512}, {"vae_tile": 512, "attention_chunk": 1024}):
        added = {name: value for name, value in extra.items() if current[name] is None}
        if added and free is not None and sum(needs(**(current | added)).values()) <= free:
            hints = ["add " + " ".join(f"{MEMORY_FLAGS[name]} {value}" for name, value in added.items())]
            break
    check_fits(needs(**current), free, hints)


MEMORY_FLAGS = {"vae_tile": "--tile-vae", "attention_chunk": "--attention-chunk"}


def model_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256, cached by path, size and mtime."""
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd" / "hashes.json"
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # damaged: start afresh
        cache = {}
    if key not in cache:
        cache[key] = sha256(path)[:10]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        except OSError:
            pass  # an unwritable cache only costs hashing again next time
    return cache[key]


def infotext(parameters: Parameters, index: int, model: str, hash_: str) -> str:
    """A1111's `parameters` text for image `index`: prompt, negative prompt, then "Key: value" pairs its PNG-info
    reads back."""
    p = parameters
    per_prompt = p.batch_size
    prompt, negative = p.prompts[index // per_prompt], p.negative_prompts[index // per_prompt]
    fields = {
        "Steps": p.steps,
        "Sampler": p.sampler,
        "Schedule type": "Karras" if p.karras else None,
        "CFG scale": p.cfg_scale,
        "Seed": p.seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": hash_,
        "Model": model,
        "Denoising strength": p.strength,
        "Mask blur": p.mask_blur,
        "Inpaint area": "Only masked" if p.padding_mask_crop is not None else None,
        "Masked area padding": p.padding_mask_crop,
        "Masked content": p.masked_content,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "Eta": p.eta or None,
        "Batch size": per_prompt if per_prompt > 1 else None,
        "Batch pos": index % per_prompt if per_prompt > 1 else None,
        "Token merging ratio": p.tome or None,
        "DeepCache": ",".join(map(str, p.deepcache)) if p.deepcache else None,
        "Lora hashes": '"' + ", ".join(f"{n}: {h}" for n, h in p.lora_hashes.items()) + '"' if p.lora_hashes else None,
    }
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    text = "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)])
    return text.replace("\0", "")  # a PNG text chunk cannot hold NUL; the tokenizer drops it from prompts too


def save_png(image: Image.Image, folder: Path, suffix: str, info: str) -> Path:
    """Saves as the next free `NNNNN-suffix.png`: written to a temporary file, then hard-linked into place, which
    fails rather than replace a file that appeared meanwhile, so nothing is overwritten or left half-written."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    number = max(numbers, default=-1) + 1
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", info)
    tmp = temporary_path(folder, f"{suffix}.png")
    try:
        image.save(tmp, format="PNG", pnginfo=chunk)
        while True:
            path = folder / f"{number:05d}-{suffix}.png"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                number += 1
    finally:
        tmp.unlink(missing_ok=True)


def tune(models, args: argparse.Namespace) -> None:
    """The speed and memory options that change the networks (the rest are generate()'s)."""
    for net in models.named().values():
        set_attention_chunk(net, args.attention_chunk)
        if args.channels_last:
            net.to(memory_format=torch.channels_last)
    if args.compile:
        models.diffusion.compile()


def run(args: argparse.Namespace) -> list[Path]:
    image = validate(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    checkpoint = args.ckpt or DEFAULT_CHECKPOINT
    if args.ckpt is None and not checkpoint.is_file():
        raise ValueError(f"the built-in model {checkpoint} is missing; pass --ckpt with an SD v1.x checkpoint")
    check_memory(args, checkpoint, image, device, dtype)
    if args.ckpt is None:
        print("built-in shapes model; pass --ckpt for SD v1.x")
    models = load_models(checkpoint, device="cpu" if args.low_vram else device, dtype=dtype, ema=args.ema, vae=args.vae)
    tune(models, args)
    for path, strength in args.loras:
        lora = load_lora(models, path, strength=strength)
        skipped = f", {len(lora.skipped)} keys skipped" if lora.skipped else ""
        print(f"LoRA {path.name} at {strength:g}: {len(lora.layers)} layers{skipped}")
    if args.embeddings is not None:
        print(f"embeddings: {', '.join(load_embeddings(models, args.embeddings))}")
    maps = WordMaps(models, args.prompt) if args.attention_maps else contextlib.nullcontext()
    steps = Steps() if args.save_steps else None
    with maps:
        result = generate(
            args.prompt,
            models,
            negative_prompt=args.negative,
            sampler=args.sampler,
            karras=args.karras,
            eta=args.eta,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            width=args.width,
            height=args.height,
            batch_size=args.batch,
            init_image=image,
            strength=args.strength,
            mask=args.mask,
            mask_blur=args.mask_blur,
            paste_back=args.paste_back,
            padding_mask_crop=args.only_masked,
            masked_content=args.masked_content,
            clip_skip=args.clip_skip,
            emphasis=args.emphasis,
            pad_prompts=args.pad_prompts,
            lora_dir=args.lora_dir,
            device=device,
            vae_tile=args.tile_vae,
            on_step=steps,
            deepcache=args.deepcache,
            tome=args.tome,
        )
    print(f"seed {result.seed}")
    name, hash_ = checkpoint.stem if checkpoint.is_file() else checkpoint.name, model_hash(checkpoint)
    paths = [
        save_png(image, args.outdir, str(result.seed), infotext(result.parameters, i, name, hash_))
        for i, image in enumerate(result.images)
    ]
    if len(result.images) > 1:
        info = infotext(result.parameters, 0, name, hash_)
        paths.append(save_png(grid(result.images), args.outdir, f"grid-{result.seed}", info))
    if args.attention_maps:
        (image,) = result.images
        sheet = HeatMaps(image, maps.heat_maps(image.height, image.width), result).sheet()
        paths.append(
            save_png(sheet, args.outdir, f"{result.seed}-attention", infotext(result.parameters, 0, name, hash_))
        )
    if steps is not None:
        trajectory = steps.trajectory(models, result, args.tile_vae)
        for i in range(len(result.images)):
            info = infotext(result.parameters, i, name, hash_)
            paths.append(save_png(trajectory.strip(i), args.outdir, f"{result.seed}-steps", info))
    for path in paths:
        print(f"wrote {path}")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        try:
            run(args)
        except (ValueError, CheckpointError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: nothing more was written", file=sys.stderr)
            return 130
    return 0


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the CLI's other messages: `warning: ...` on one line, without the source line."""
    print(f"warning: {str(message).splitlines()[0]}", file=sys.stderr)
