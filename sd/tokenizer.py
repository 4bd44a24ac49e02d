"""CLIP's byte-level BPE tokenizer, as SD v1 uses it: prompt -> 77 token ids, fully offline.

The steps are those of the reference (transformers' original Python CLIPTokenizer, with ftfy installed):
  1. special tokens (`<|startoftext|>`, `<|endoftext|>`) are split out of the prompt first;
  2. each remaining piece is cleaned up (ftfy-style text fixes), its whitespace collapsed, and lowercased;
  3. it is cut into words, contractions, single digits and runs of other symbols (CLIP's pre-tokenisation);
  4. each piece's UTF-8 bytes are spelled with 256 printable characters and merged by BPE rank.

Text fixes: ftfy is not a dependency. Without it we apply the fixes of `ftfy.fix_text` that matter for prompts, in
its order and to its fixed point: HTML entities (unless the line holds a `<`), C1 controls read as Windows-1252,
latin ligatures, full-width forms, curly quotes, line breaks, surrogates, terminal escapes, control characters and
BOMs, NFC. When ftfy is installed we call `ftfy.fix_text` itself, which adds what we leave out: repairing mojibake
(text decoded with the wrong encoding, such as "cafÃ©" for "café").

Character classes come from Python's `unicodedata`, where the reference uses the `regex` package; they agree except
on characters assigned after Python's Unicode version (`unicodedata.unidata_version`).
"""

import functools
import gzip
import hashlib
import html.entities
import json
import re
import unicodedata
import warnings
from pathlib import Path

import torch

from sd.package_data import package_file

BPE_FILE = package_file("data", "bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP was trained with; the file holds more
START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes stand for themselves, the other 68 are moved
    up to U+0100 and beyond, so BPE never works on whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(moved)}


# -- text fixes (see the module docstring) ----------------------------------------------------------------------

# Unicode's White_Space characters: what the reference's `\s` matches (Python's `str.isspace` adds U+001C-U+001F).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")

LIGATURES = str.maketrans(
    {
        "Ĳ": "IJ",
        "ĳ": "ij",
        "ŉ": "ʼn",
        "Ǳ": "DZ",
        "ǲ": "Dz",
        "ǳ": "dz",
        "Ǆ": "DŽ",
        "ǅ": "Dž",
        "ǆ": "dž",
        "Ǉ": "LJ",
        "ǈ": "Lj",
        "ǉ": "lj",
        "Ǌ": "NJ",
        "ǋ": "Nj",
        "ǌ": "nj",
        "ﬀ": "ff",
        "ﬁ": "fi",
        "ﬂ": "fl",
        "ﬃ": "ffi",
        "ﬄ": "ffl",
        "ﬅ": "ſt",
        "ﬆ": "st",
    }
)
# full-width ASCII and half-width katakana/hangul -> their usual forms; the ideographic space -> a space
WIDTH = str.maketrans(
    {0x3000: " "}
    | {
        i: unicodedata.normalize("NFKC", chr(i))
        for i in range(0xFF01, 0xFFF0)
        if unicodedata.normalize("NFKC", chr(i)) != chr(i)
    }
)
CURLY_QUOTES = str.maketrans(
    {c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"} | {c: '"' for c in "\u201c\u201d\u201e\u201f"}
)
LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
# C0 controls but tab, newline, form feed and carriage return; DEL; deprecated Arabic format controls; the BOM;
# the interlinear annotation and object replacement characters
CONTROL = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)
TERMINAL_ESCAPE = re.compile("\x1b\\[[\\d;]*[a-zA-Z]")
SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
SURROGATE = re.compile("[\ud800-\udfff]")
C1_CONTROL = re.compile("[\x80-\x9f]")
HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


@functools.cache
def html_entities() -> dict[str, str]:
    """Named entities that end in a semicolon; also their all-caps spelling where that is unambiguous ("&EACUTE;")."""
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                entities["&" + name.upper()] = char.upper()
    return entities


def _unescape_entity(match: re.Match) -> str:
    entity = match.group(0)
    if entity in html_entities():
        return html_entities()[entity]
    if entity.startswith("&#"):
        char = html.unescape(entity)
        return entity if ";" in char else char  # a reference html.unescape could not consume whole stays as written
    return entity


def _c1_as_windows_1252(match: re.Match) -> str:
    try:
        return match.group(0).encode("latin-1").decode("windows-1252")
    except UnicodeDecodeError:  # the five bytes Windows-1252 leaves undefined stay as they are
        return match.group(0)


def _join_surrogates(match: re.Match) -> str:
    high, low = (ord(c) for c in match.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


def _fix_segment(text: str, unescape_html: bool) -> str:
    while True:
        before = text
        if unescape_html:
            text = HTML_ENTITY.sub(_unescape_entity, text)
        text = C1_CONTROL.sub(_c1_as_windows_1252, text)
        text = text.translate(LIGATURES).translate(WIDTH).translate(CURLY_QUOTES)
        text = LINE_BREAKS.sub("\n", text)
        text = SURROGATE.sub("\ufffd", SURROGATE_PAIR.sub(_join_surrogates, text))
        text = TERMINAL_ESCAPE.sub("", text).translate(CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """ftfy.fix_text without its mojibake repair. Like ftfy, it works line by line (lines end at "\\n" only), and
    stops unescaping HTML from the first line that holds a `<`: such text may be markup, not escaped text."""
    out, unescape_html = [], True
    for line in re.split("(?<=\n)", text):
        unescape_html = unescape_html and "<" not in line
        out.append(_fix_segment(line, unescape_html))
    return "".join(out)


def clean(text: str) -> str:
    """Text fixes, whitespace runs -> one space, stripped, lowercased: what CLIP saw in training."""
    try:
        from ftfy import fix_text as fix
    except ImportError:
        fix = fix_text
    return WHITESPACE_RUN.sub(" ", fix(text)).strip().lower()


# -- pre-tokenisation and BPE ---------------------------------------------------------------------------------------


def _char_class(categories: str) -> str:
    """A regex character class body of every code point whose Unicode category starts with one of `categories`."""
    ranges, start = [], None
    for cp in range(0x110001):
        inside = cp < 0x110000 and unicodedata.category(chr(cp))[0] in categories
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


@functools.cache
def pretokenizer() -> re.Pattern:
    """CLIP's pattern: special tokens, contractions, letter runs, single digits, runs of anything else but spaces.

    The reference matches case-insensitively, so "'\u017f" (long s) is a contraction, and U+0345 (which folds to a
    Greek letter) is neither letter nor symbol and is dropped; both are spelled out here.
    """
    letters, numbers = _char_class("L"), _char_class("N")
    return re.compile(
        f"{re.escape(START)}|{re.escape(END)}|'[s\u017f]|'t|'re|'ve|'m|'ll|'d"
        f"|[{letters}]+|[{numbers}]|[^{WHITESPACE}\u0345{letters}{numbers}]+"
    )


class Tokenizer:
    """CLIP's BPE tokenizer. `tokenizer(prompts)` gives SD v1's [B, 77] input; `encode` the raw, unframed ids."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = vocab
        self.tokens = {i: token for token, i in vocab.items()}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {START: [START], END: [END]}
        self.warned: set[str] = set()

    @classmethod
    def from_bpe_file(cls, path: str | Path = BPE_FILE, sha256: str | None = BPE_SHA256) -> "Tokenizer":
        """OpenAI's merges file; the vocabulary is derived from it as CLIP's was: the 256 byte characters, the same
        ending a word (`</w>`), every merge joined, then the start and end tokens (49,408 in all)."""
        data = Path(path).read_bytes()
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{path}: not OpenAI's bpe_simple_vocab_16e6.txt.gz (sha256 differs); restore it from git")
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        chars = list(bytes_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
        return cls({token: i for i, token in enumerate(tokens)}, merges)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """A Hugging Face tokenizer folder (`vocab.json` and `merges.txt`, as in diffusers-format SD folders)."""
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
        return cls(vocab, [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]])

    def bpe(self, word: str) -> list[str]:
        """Byte-spelled word -> BPE tokens: repeatedly merge the adjacent pair of lowest rank, everywhere."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, NUM_MERGES))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if parts[i : i + 2] == list(pair):
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """All of a prompt's ids, without the start/end framing and untruncated."""
        ids = []
        for piece in re.split(f"({re.escape(START)}|{re.escape(END)})", text):
            if piece in (START, END):
                ids.append(self.vocab[piece])
                continue
            for word in pretokenizer().findall(clean(piece)):
                spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self.bpe(spelled))
        return ids

    def frame(self, ids: list[int], prompt: str = "") -> list[int]:
        """SD v1's input: start, the first 75 ids, end, padded with end tokens to 77. Warns once per prompt cut."""
        room = CONTEXT_LENGTH - 2
        if len(ids) > room and prompt not in self.warned:
            self.warned.add(prompt)
            dropped = self.decode(ids[room:])
            dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
            warnings.warn(
                f"prompt truncated: CLIP reads {room} tokens, this prompt has {len(ids)}; "
                f"the last {len(ids) - room} were dropped: {dropped!r}",
                stacklevel=3,
            )
        framed = [self.start_id, *ids[:room], self.end_id]
        return framed + [self.end_id] * (CONTEXT_LENGTH - len(framed))

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """One prompt or a list of them -> LongTensor [B, 77]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([self.frame(self.encode(p), p) for p in prompts], dtype=torch.long)

    def decode(self, ids) -> str:
        """Ids -> text, without the start/end tokens (the cleanup and lowercasing are not undone)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        text = "".join(self.tokens[i] for i in ids if i not in (self.start_id, self.end_id))
        return (
            bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()
        )


@functools.cache
def default_tokenizer() -> Tokenizer:
    """SD v1's tokenizer, from the merges file shipped in data/."""
    return Tokenizer.from_bpe_file()
