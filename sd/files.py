"""Writing files whole or not at all: into a temporary file beside the target, moved into place once complete.

A temporary file is named `.<name>.sd-<pid>-<n>.tmp`. A run that is killed outright (kill -9, a power cut) cannot
remove its own, so every writer first removes those in its folder whose process is gone.
"""

import os
import re
import time
from pathlib import Path

import torch

TEMPORARY = re.compile(r"\..*\.sd-(?P<pid>\d+)-\d+\.tmp")


def temporary_path(folder: Path, name: str) -> Path:
    """A fresh temporary file name in `folder` for a file that will become `name`."""
    return folder / f".{name}.sd-{os.getpid()}-{time.monotonic_ns()}.tmp"


def remove_stale_temporaries(folder: Path) -> None:
    """Removes the temporary files in `folder` that a process no longer running left behind."""
    for path in folder.glob(".*.sd-*.tmp"):
        match = TEMPORARY.fullmatch(path.name)
        if match and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def new_file_mode() -> int:
    """The permission bits a newly created file gets: 0666 less the umask (which can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomically(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Writes a .safetensors file whole or not at all. safetensors creates its files readable by their owner
    alone; this one gets new_file_mode()."""
    from safetensors.torch import save_file

    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path.parent, path.name)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
