"""Files that ship with the package: the built-in model (`weights/`) and the tokenizer's vocabulary (`data/`).

They live in the repository's top-level folders of those names; setup.py installs those folders inside the package,
as `sd/weights/` and `sd/data/`, so an installed `sd` finds them wherever it is run from. A source checkout (or an
editable install of one) has no such copies and reads the top-level folders themselves.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def package_file(folder: str, name: str) -> Path:
    """`folder/name` as installed with the package, or else in the source checkout the package was imported from."""
    installed = PACKAGE / folder / name
    return installed if installed.exists() else PACKAGE.parent / folder / name
