"""Tokenising 10,000 distinct prompts: ours against SD v1's reference tokenizer (transformers' Python
CLIPTokenizer with ftfy), and, for scale, transformers 5's Rust tokenizer.

    python bench/tokenizer.py [--oracle-python /tmp/oracle/bin/python]

transformers 5 no longer has the Python tokenizer; --oracle-python names a Python with transformers<5 and ftfy (see
tests/data/make_tokenizer_golden.py for the two commands that make one). Each side starts from a fresh tokenizer
(cold BPE cache), three times; the median is reported.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "data")]

from common import write_table  # noqa: E402
from make_tokenizer_golden import corpus, derive_hf_files  # noqa: E402

from sd.tokenizer import Tokenizer  # noqa: E402

REPEATS = 3
REFERENCE = """
import json, statistics, sys, time
from transformers import CLIPTokenizer
folder, prompts = sys.argv[1], json.load(open(sys.argv[2]))
times = []
for _ in range(int(sys.argv[3])):
    tok = CLIPTokenizer(folder + "/vocab.json", folder + "/merges.txt")
    assert tok.fix_text is not None, "ftfy is not installed next to the reference"
    start = time.perf_counter()
    for p in prompts:
        tok(p, padding="max_length", max_length=77, truncation=True)
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: the Rust tokenizer cannot take them
        return False


def prompts(n: int = 10_000) -> list[str]:
    rng, pieces, out = random.Random(0), [p for p in corpus() if encodable(p)], set()
    while len(out) < n:
        out.add(", ".join(rng.sample(pieces, rng.randint(2, 5))))
    return sorted(out)


def time_ours(texts: list[str]) -> float:
    import warnings

    warnings.simplefilter("ignore")  # long prompts warn once each
    times = []
    for _ in range(REPEATS):
        tokenizer = Tokenizer.from_bpe_file()
        start = time.perf_counter()
        for text in texts:
            tokenizer(text)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_rust(texts: list[str], folder: Path) -> float:
    from transformers import CLIPTokenizer

    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().strip().split("\n")[1:]]
    times = []
    for _ in range(REPEATS):
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
        start = time.perf_counter()
        for text in texts:
            tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracle-python", help="a Python with transformers<5 and ftfy: the SD v1 reference")
    args = parser.parse_args()

    texts = prompts()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        derive_hf_files(folder)
        (folder / "prompts.json").write_text(json.dumps(texts))
        ours = time_ours(texts)
        rows = [["sd (ours)", f"{ours:.2f}", f"{len(texts) / ours:,.0f}", "1.00"]]
        if args.oracle_python:
            out = subprocess.run(
                [args.oracle_python, "-c", REFERENCE, str(folder), str(folder / "prompts.json"), str(REPEATS)],
                capture_output=True,
                text=True,
                check=True,
            )
            reference = float(out.stdout.split()[-1])
            rows.append(
                [
                    "transformers 4 Python CLIPTokenizer + ftfy (SD v1's)",
                    f"{reference:.2f}",
                    f"{len(texts) / reference:,.0f}",
                    f"{reference / ours:.2f}",
                ]
            )
        try:
            rust = time_rust(texts, folder)
            rows.append(
                [
                    "transformers 5 CLIPTokenizer (Rust; not SD v1's rules)",
                    f"{rust:.2f}",
                    f"{len(texts) / rust:,.0f}",
                    f"{rust / ours:.2f}",
                ]
            )
        except ImportError:
            pass
    notes = [
        f"{len(texts):,} distinct prompts, fresh tokenizer each run, median of {REPEATS}; "
        "ratio = that tokenizer's time / ours (above 1: ours is faster)."
    ]
    if not args.oracle_python:
        notes.append("The SD v1 reference was not run: pass --oracle-python.")
    write_table(
        "tokenizer",
        "Tokenizing 10,000 prompts to [1, 77] ids (CPU)",
        ["tokenizer", "seconds", "prompts/s", "ratio"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
