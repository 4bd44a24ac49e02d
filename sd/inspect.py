"""`python -m sd.inspect [CHECKPOINT] [--depth N] [--lora FILE]`: the networks' module trees with parameter counts,
or which layers a LoRA changes and by how much.

Without a checkpoint it describes SD v1.5's configuration, built on the meta device (no memory, no weights).
"""

import argparse
import sys
from collections import Counter

import torch

from sd.lora import read_lora
from sd.model_loader import load_models
from sd.models import SD_V1_CONFIGS, CheckpointError, Models, networks
from sd.tokenizer import default_tokenizer


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tree_lines(module: torch.nn.Module, name: str, max_depth: int, depth: int = 0) -> list[str]:
    """One line per module with parameters, down to `max_depth` levels below `module`."""
    lines = [f"{'  ' * depth + name:<44} {type(module).__name__:<20} {count(module):>13,}"]
    if depth < max_depth:
        for child_name, child in module.named_children():
            if count(child):
                lines += tree_lines(child, child_name, max_depth, depth + 1)
    return lines


def report(nets: dict[str, torch.nn.Module], title: str, max_depth: int) -> str:
    lines = [title, "", f"{'component':<12} {'network':<10} {'parameters':>15}"]
    lines += [f"{name:<12} {type(net).__name__:<10} {count(net):>15,}" for name, net in nets.items()]
    lines += [f"{'total':<23} {sum(count(n) for n in nets.values()):>15,}", ""]
    lines += list(dict.fromkeys(repr(net.cfg) for net in nets.values()))
    if max_depth > 0:
        for name, net in nets.items():
            lines += ["", *tree_lines(net, name, max_depth)]
    return "\n".join(lines)


def lora_report(models: Models, path: str) -> str:
    """The layers a LoRA changes, most changed first: rank, alpha / rank, |dW| (Frobenius, at strength 1) and,
    where the model's weights are loaded, |dW| / |W|."""
    layers, skipped = read_lora(models, path)
    real = not models.diffusion.out[2].weight.is_meta
    rows = []
    for layer in layers:
        change = (layer.scale * layer.delta()).norm().item()
        relative = change / layer.module.weight.float().norm().item() if real else None
        rows.append((layer, change, relative))
    rows.sort(key=lambda row: -(row[2] if real else row[1]))
    counts = Counter(layer.network for layer in layers)
    lines = [f"{path}: {len(layers)} layers ({', '.join(f'{name} {n}' for name, n in counts.items())})"]
    if skipped:
        reasons = Counter(skipped.values())
        lines.append(f"  {len(skipped)} keys skipped: " + "; ".join(f"{n} {why}" for why, n in reasons.items()))
    lines += ["", f"{'layer':<62} {'rank':>4} {'alpha/rank':>10} {'|dW|':>9} {'|dW|/|W|':>9}"]
    for layer, change, relative in rows:
        name = f"{layer.network}.{layer.path}"
        ratio = f"{relative:9.2%}" if relative is not None else ""
        lines.append(f"{name:<62} {layer.down.shape[0]:>4} {layer.scale:>10.3g} {change:>9.3g} {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="an SD v1.x checkpoint; default: SD v1.5's configuration")
    parser.add_argument("--depth", type=int, default=2, help="levels of the module tree to show (default 2)")
    parser.add_argument("--lora", help="a LoRA file: list the layers it changes (relative to CHECKPOINT's weights)")
    args = parser.parse_args(argv)

    try:
        if args.checkpoint is None:
            with torch.device("meta"):
                nets = networks(SD_V1_CONFIGS)
            models = Models(default_tokenizer(), **nets, source="SD v1.5 configuration", format="meta")
            title = "SD v1.5 configuration (built on the meta device: no weights loaded)"
        else:
            models = load_models(args.checkpoint)
            nets = models.named()
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for n in nets.values() for p in n.parameters()})
            title = f"{args.checkpoint} ({', '.join(dtypes)} weights)"
        print(lora_report(models, args.lora) if args.lora else report(nets, title, args.depth))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
