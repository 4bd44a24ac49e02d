"""Our CLIP tokenizer against SD v1's reference (transformers' Python CLIPTokenizer with ftfy), token for token.

transformers 5 no longer ships that tokenizer, so its ids for a corpus of 1,095 prompts were recorded with
transformers 4.57 by tests/data/make_tokenizer_golden.py (the command is in its docstring). What is live here: ftfy,
the `regex` package, and transformers 5's Rust CLIPTokenizer.
"""

import json
import re
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
from make_tokenizer_golden import MOJIBAKE, corpus, derive_hf_files

from sd.tokenizer import BPE_FILE, WHITESPACE, Tokenizer, default_tokenizer, fix_text, pretokenizer

GOLDEN = json.loads((Path(__file__).parent / "data" / "tokenizer_golden.json").read_text())
ENTRIES = GOLDEN["entries"]


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    derive_hf_files(folder)
    return folder


def ids77(tokenizer, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompt)[0].tolist()


def mismatches(tokenizer) -> list[str]:
    return [e["prompt"] for e in ENTRIES if ids77(tokenizer, e["prompt"]) != e["ids"]]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),
        ("a photo of an astronaut riding a horse on mars", [320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496]),
        (
            "Apple CoreML developer tools on a Macbook Air are fast",
            [3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953],
        ),
        ("", []),
    ],
)
def test_public_token_vectors(tokenizer, prompt, expected):
    framed = [49406, *expected, 49407]
    assert ids77(tokenizer, prompt) == framed + [49407] * (77 - len(framed))


def test_vocabulary_is_derived_from_openais_merges(tokenizer):
    assert len(tokenizer.vocab) == 49408
    assert (tokenizer.vocab["!"], tokenizer.vocab["a</w>"], tokenizer.vocab["photo</w>"]) == (0, 320, 1125)
    assert (tokenizer.start_id, tokenizer.end_id) == (49406, 49407)
    assert sorted(tokenizer.vocab.values()) == list(range(49408)), "ids are not 0..49407 exactly once"


def test_reference_corpus_is_large_and_from_the_reference_with_ftfy():
    assert len(ENTRIES) >= 1000
    assert "with ftfy" in GOLDEN["about"]["reference"] and "transformers 4." in GOLDEN["about"]["reference"]
    assert [e["prompt"] for e in ENTRIES] == corpus(), "the corpus changed: rerun make_tokenizer_golden.py"


def test_every_prompt_of_the_corpus_gives_the_references_77_ids(tokenizer):
    pytest.importorskip("ftfy")
    bad = mismatches(tokenizer)
    assert not bad, f"{len(bad)} of {len(ENTRIES)} prompts differ, first: {bad[:3]!r}"


def test_long_prompts_keep_all_their_raw_ids(tokenizer):
    long = [e for e in ENTRIES if "raw" in e]
    assert len(long) >= 30
    for entry in long:
        assert tokenizer.encode(entry["prompt"]) == entry["raw"], entry["prompt"]


def test_without_ftfy_only_mojibake_repair_differs(monkeypatch):
    """Without ftfy the one fix we lack is mojibake repair: the prompts that differ are ones whose encoding ftfy
    repairs, and the corpus's mojibake pieces (MOJIBAKE) all differ."""
    ftfy = pytest.importorskip("ftfy")
    monkeypatch.setitem(sys.modules, "ftfy", None)  # `import ftfy` now raises ImportError
    bad = mismatches(Tokenizer.from_bpe_file())
    no_mojibake = [p for p in bad if ftfy.fix_encoding(p) == p]
    assert not no_mojibake, f"prompts without mojibake differ: {no_mojibake[:3]!r}"
    for piece in MOJIBAKE:
        assert piece in bad, f"{piece!r} is no longer a difference: update MOJIBAKE"
    assert len(bad) == 110, f"{len(bad)} prompts differ without ftfy (110 expected)"


def test_our_text_fixes_are_ftfys_without_mojibake_repair():
    ftfy = pytest.importorskip("ftfy")
    texts = corpus() + ["\ud83d\ude00 pair", "\ude00\ud83d reversed", "a\r\n\x85b", "&amp;amp;amp;", "x\n<y>\n&amp;"]
    bad = [t for t in texts if fix_text(t) != ftfy.fix_text(t, fix_encoding=False)]
    assert not bad, f"{len(bad)} texts fixed differently from ftfy, first: {bad[:3]!r}"


def test_character_classes_agree_with_the_regex_package():
    """For every code point Python's Unicode tables assign, our pattern splits it as the reference's regex does."""
    regex = pytest.importorskip("regex")
    reference = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    ours = pretokenizer()
    assigned = (chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co"))
    texts = {c: f"a{c}a'{c}".lower() for c in assigned}  # lowercased, as the tokenizer's input always is
    bad = [f"U+{ord(c):04X}" for c, text in texts.items() if ours.findall(text) != reference.findall(text)]
    assert not bad, f"{len(bad)} characters split differently: {bad[:10]}"


def test_whitespace_is_unicodes_white_space():
    regex = pytest.importorskip("regex")
    reference = [chr(c) for c in range(0x110000) if regex.fullmatch(r"\s", chr(c))]
    assert [c for c in map(chr, range(0x110000)) if re.fullmatch(f"[{WHITESPACE}]", c)] == reference


def test_a_hugging_face_tokenizer_folder_gives_the_same_vocabulary_and_merges(tokenizer, hf_folder):
    from_folder = Tokenizer.from_folder(hf_folder)
    assert from_folder.vocab == tokenizer.vocab and from_folder.ranks == tokenizer.ranks


def test_transformers5_rust_tokenizer_agrees_where_sd_v1s_rules_do_not_matter(hf_folder):
    """An independent BPE over the same derived files. It is not SD v1's tokenizer: it skips ftfy and HTML fixes,
    lowercases final sigma as plain sigma, matches case-sensitively (long s, U+0345, upper-case special tokens)."""
    ftfy = pytest.importorskip("ftfy")
    from transformers import CLIPTokenizer

    vocab = json.loads((hf_folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (hf_folder / "merges.txt").read_text().strip().split("\n")[1:]]
    rust = CLIPTokenizer(vocab=vocab, merges=merges)
    known = ("Σ", "\u0345", "'ſ", "<|ENDOFTEXT|>", "<|STARTOFTEXT|>", "&")
    checked = [
        e for e in ENTRIES if ftfy.fix_text(e["prompt"]) == e["prompt"] and not any(k in e["prompt"] for k in known)
    ]
    assert len(checked) > 500
    bad = [
        e["prompt"]
        for e in checked
        if rust(e["prompt"], padding="max_length", max_length=77, truncation=True).input_ids != e["ids"]
    ]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[:3]!r}"


def test_batch_call_gives_a_long_tensor_of_77_per_prompt(tokenizer):
    tokens = tokenizer(["a cat", "a dog", ""])
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    assert tokens[:, 0].tolist() == [49406] * 3


def test_truncation_warns_once_per_prompt_naming_what_was_dropped():
    tokenizer = Tokenizer.from_bpe_file()
    prompt = " ".join(["cat"] * 80)
    with pytest.warns(UserWarning, match=r"this prompt has 80; the last 5 were dropped: 'cat cat cat cat cat'"):
        tokenizer(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = tokenizer(prompt)  # a second call does not warn again
    assert tokens[0, -1] == 49407 and tokens[0, 75] == tokenizer.vocab["cat</w>"]


def test_decode_gives_back_the_cleaned_text(tokenizer):
    assert (
        tokenizer.decode(tokenizer("A photo of an  Astronaut, “riding”!")[0]) == 'a photo of an astronaut , " riding "!'
    )


def test_a_modified_merges_file_is_refused(tmp_path):
    changed = tmp_path / "bpe.txt.gz"
    changed.write_bytes(BPE_FILE.read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256 differs"):
        Tokenizer.from_bpe_file(changed)
