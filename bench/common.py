"""What every benchmark shares: timing, the machine's description, and the results table (printed, and written as
markdown and JSON under bench/results/)."""

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, repeats: int = 5, warmup: int = 1, min_total: float = 2.0) -> float:
    """Median wall time of `fn()` over `repeats` runs (more for a quick fn: enough runs to fill `min_total` seconds,
    so that noise does not decide a 0.1 s row), after `warmup` untimed ones."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    if warmup:
        each = (time.perf_counter() - start) / warmup
        repeats = max(repeats, min(100, math.ceil(min_total / max(each, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent process)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_table(name: str, title: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> str:
    """Prints a markdown table and writes it to bench/results/{name}.md and .json."""
    info = machine()
    lines = [f"## {title}", "", f"machine: {', '.join(f'{k} {v}' for k, v in info.items())}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    lines += ["", *notes] if notes else []
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    records = [dict(zip(columns, row)) for row in rows]
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"title": title, "machine": info, "rows": records, "notes": list(notes)}, indent=1)
    )
    return text
