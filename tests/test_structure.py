"""The package's shape: no module of `sd` imports itself back through others (at any depth, lazy imports included),
and a built wheel installed elsewhere runs with the data it ships."""

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "sd"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every sd module -> the sd modules it imports anywhere in its source (`from sd.x import y` counts as sd.x, or
    as sd.x.y where that is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [node, target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, path + [node])):
                return cycle
        state[node] = "done"
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node, []))), None)


def test_no_module_of_sd_imports_itself_back():
    graph = import_graph()
    assert {"sd.pipeline", "sd.samplers", "sd.sampling", "sd.train.trainer"} <= set(graph), sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """A fresh virtual environment with a wheel of this checkout installed (no dependencies: the running
    environment's torch, numpy, ... are made visible to it through a .pth file, so nothing is downloaded)."""
    where = tmp_path_factory.mktemp("wheel")
    source = where / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    for folder in ("sd", "weights", "data"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", where / "dist", source],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (where / "dist").glob("sd-*.whl")
    env = where / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([python, "-c", query], text=True).strip())
    # the running environment's packages, except an editable install of sd, which only a path line could add
    (site / "running-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return python


def run_outside(python: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([python, *args], cwd=folder, env=environment, capture_output=True, text=True, timeout=600)


def test_an_installed_wheel_runs_the_demo_and_inspect_from_another_folder(installed_wheel, tmp_path):
    query = "import sd.model_loader as m, sd.tokenizer as t; print(m.__file__, m.DEFAULT_CHECKPOINT, t.BPE_FILE)"
    where = run_outside(installed_wheel, tmp_path, "-c", query)
    assert where.returncode == 0, where.stderr[-2000:]
    module, checkpoint, vocabulary = map(Path, where.stdout.split())
    package = module.parent
    assert ROOT not in module.parents, f"sd was imported from the checkout ({module}), not from the wheel"
    assert checkpoint.parent == package / "weights" and checkpoint.is_file(), f"the built-in model: {checkpoint}"
    assert vocabulary.parent == package / "data" and vocabulary.is_file(), f"the tokenizer's vocabulary: {vocabulary}"

    prompt = "a red circle on a blue background"
    demo = run_outside(installed_wheel, tmp_path, "-m", "sd", prompt, "--steps", "2", "--seed", "1")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 1, demo.stdout
    for args in ([], [str(checkpoint)]):
        inspect = run_outside(installed_wheel, tmp_path, "-m", "sd.inspect", *args)
        assert inspect.returncode == 0 and "diffusion" in inspect.stdout, inspect.stderr[-2000:]
