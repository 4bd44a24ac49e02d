"""`python -m sd.inspect [CHECKPOINT] [--depth N]`: the networks' module trees with parameter counts.

Without a checkpoint it describes SD v1.5's configuration, built on the meta device (no memory, no weights).
"""

import argparse
import sys

import torch

from sd.model_loader import load_models
from sd.models import SD_V1_CONFIGS, CheckpointError, networks


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="an SD v1.x checkpoint; default: SD v1.5's configuration")
    parser.add_argument("--depth", type=int, default=2, help="levels of the module tree to show (default 2)")
    args = parser.parse_args(argv)

    if args.checkpoint is None:
        with torch.device("meta"):
            nets = networks(SD_V1_CONFIGS)
        title = "SD v1.5 configuration (built on the meta device: no weights loaded)"
    else:
        try:
            models = load_models(args.checkpoint)
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        nets = models.named()
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for n in nets.values() for p in n.parameters()})
        title = f"{args.checkpoint} ({', '.join(dtypes)} weights)"
    print(report(nets, title, args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
