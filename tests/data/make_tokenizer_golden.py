"""Writes tests/data/tokenizer_golden.json: a corpus of prompts and the ids SD v1's reference tokenizer gives them.

The reference is transformers' original Python CLIPTokenizer with ftfy installed, which transformers 5 no longer
ships, so it runs in a separate environment (no torch needed):

    python3 -m venv /tmp/oracle && /tmp/oracle/bin/pip install "transformers<5" ftfy regex
    /tmp/oracle/bin/python tests/data/make_tokenizer_golden.py

It reads vocab.json and merges.txt derived here from OpenAI's data/bpe_simple_vocab_16e6.txt.gz, independently of
sd/tokenizer.py, so the test also checks our own derivation.
"""

import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("tokenizer_golden.json")

SUBJECTS = [
    "a cat",
    "an astronaut riding a horse on mars",
    "a lighthouse at dusk",
    "a bowl of ramen",
    "a red circle",
    "the eiffel tower",
    "a cyberpunk city street",
    "a portrait of an old fisherman",
    "a fox in the snow",
    "a steampunk airship",
    "a medieval castle",
    "a bonsai tree",
    "two dogs playing",
    "a robot reading a book",
    "a vintage car",
    "a waterfall in a jungle",
    "a dragon made of glass",
    "a cozy cabin",
    "mount fuji",
    "a teapot shaped like a pumpkin",
    "New York City at night",
    "a Victorian lady",
    "an owl",
    "a 1960s diner",
]
STYLES = [
    "oil painting",
    "by Greg Rutkowski",
    "trending on artstation",
    "8k",
    "unreal engine 5",
    "studio ghibli style",
    "photorealistic",
    "35mm film",
    "watercolor",
    "highly detailed",
    "sharp focus",
    "bokeh",
    "concept art",
    "octane render",
    "ukiyo-e",
    "pixel art",
    "HDR",
    "f/1.8",
    "golden hour",
    "volumetric lighting",
]
A1111 = [
    "(masterpiece:1.2), best quality, {s}",
    "((({s}))), [blurry], (worst quality:1.4)",
    "{s} <lora:add_detail:0.8>",
    "[{s}:a dog:0.5], {{highly detailed}}",
    "1girl, solo, {s}, (smile:1.1), looking at viewer",
    "{s} AND a moon",
    "{s}, (extremely detailed CG unity 8k wallpaper), (((HDR)))",
    "score_9, score_8_up, {s}, rating:safe",
    "{s} BREAK red theme",
    "(({s})):1.3 \\(parenthesis\\)",
]
SCRIPTS = [
    "一只可爱的猫坐在窗台上",
    "富士山と桜、浮世絵風",
    "カタカナとひらがなのテスト",
    "서울의 밤거리 풍경",
    "قطة جميلة في الحديقة",
    "חתול על הגג",
    "Кот в сапогах, масляная живопись",
    "Ελληνικός ναός στο ηλιοβασίλεμα",
    "ΣΑΣ ΟΔΟΣ ΣΟΦΟΣ",
    "नदी के किनारे एक मंदिर",
    "แมวน่ารักในสวน",
    "নদীর ধারে নৌকা",
    "கோவில் மற்றும் யானை",
    "ქართული ღვინო",
    "Հայաստանի լեռներ",
    "ቡና በኢትዮጵያ",
    "Phở bò ở Hà Nội, ảnh chụp",
    "İstanbul'da bir kedi, ılık rüzgâr",
    "Straße in München, Größe",
    "Ærøskøbing havn, Œuvre, Ðorđe",
    "Zażółć gęślą jaźń",
    "Čeština: příliš žluťoučký kůň",
    "Ñandú en la pampa, año 2024",
    "ꦗꦮ script",
    "ᚠᚢᚦ runes",
    "𝕸𝖆𝖙𝖍 𝓯𝓸𝓷𝓽𝓼",
    "ℌ𝔢𝔩𝔩𝔬",
    "Ⓒⓘⓡⓒⓛⓔⓓ",
    "ǅemal ǈubljana",
]
EMOJI = [
    "🐱",
    "🚀🌕",
    "👩‍🚀",
    "👍🏽",
    "🇯🇵",
    "🏳️‍🌈",
    "1️⃣",
    "❤️",
    "🧑‍🤝‍🧑",
    "😀😃😄",
    "🏴󠁧󠁢󠁷󠁬󠁳󠁿",
    "✨",
    "☕",
    "♻️",
]
ACCENTS = [
    "cafe\u0301 au lait",
    "re\u0301sume\u0301",
    "n\u0303",
    "a\u030a",
    "Zoe\u0308",
    "ǘ",
    "ḿ",
    "q\u0307",
    "Ångström",
    "crème brûlée",
    "naïve façade",
    "piñata",
    "jalapeño",
    "smörgåsbord",
    "Ελλάδα",
]
QUOTES = [
    "\u2018single\u2019",
    "\u201cdouble\u201d",
    "it\u2019s",
    "\u201elow\u201c",
    "\u2039angle\u203a",
    "\u00abguillemets\u00bb",
    "prime\u2032s",
    "\u02bcokina",
    "\u201bodd\u201f",
    "`backtick`",
    "'plain'",
    '"plain"',
]
HTML = [
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&quot;quoted&quot;",
    "it&#39;s",
    "it&#x2019;s",
    "dots&hellip;",
    "P&eacute;rez",
    "P&EACUTE;REZ",
    "BUNDESSTRA&SZLIG;E",
    "&nbsp;space",
    "&amp;amp; double",
    "&amp no semicolon",
    "a < b &amp; c",
    "&copy; 2024 &trade;",
    "&#128512;",
    "&#xD800; bad",
    "&#0;",
    "&notanentity;",
    "&ntilde;&NTILDE;&nTILDE;",
    "&Jscr;ohn &HilbertSpace;",
    "&checkmark;",
    "&frac12; cup",
    "x &gt; y",
    "&lt;|endoftext|&gt;",
]
LIGATURES = ["ﬁsh", "ﬂower", "oﬀice", "eﬃcient", "baﬄe", "ﬅ", "ﬆar", "ĳs", "Ĳssel", "ǆungla", "Ǳ", "ŉ"]
WIDE = [
    "ＬＯＵＤ　ＮＯＩＳＥＳ",
    "ｆｕｌｌ－ｗｉｄｔｈ　ｔｅｘｔ！",
    "１２３４",
    "ｶﾀｶﾅ",
    "ﾊﾝｶｸ",
    "Ｕﾀｰﾝ",
    "￥１００",
    "（ｐａｒｅｎｓ）",
    "ﾞﾟ",
]
CONTROL = [
    "tab\there",
    "new\nline",
    "crlf\r\nline",
    "cr\ronly",
    "bell\x07",
    "nul\x00char",
    "esc \x1b[31mred\x1b[0m",
    "del\x7f",
    "\ufeffbom start",
    "mid\ufeffbom",
    "vt\x0bff\x0c",
    "fs\x1cgs\x1drs\x1eus\x1f",
    "zw\u200bsp",
    "zw\u200dj",
    "rtl\u200f",
    "nel\x85line",
    "ls\u2028ps\u2029",
    "c1 \x93quoted\x94",
    "\x80euro",
    "\x81undefined",
    "\u206aarabic",
    "\ufffcobj",
    "lone \ud83d surrogate",
    "\udc00 low first",
    "\x1b[1;32mbold",
    "a\u0345b",
    "\u0345",
]
DIGITS = [
    "1920x1080",
    "3.14159",
    "2024年",
    "٣٤٥",
    "۱۲۳",
    "१२३",
    "Ⅻ",
    "½",
    "x²",
    "10,000",
    "007",
    "4k 8k 16k",
    "v1.5",
    "seed:42",
    "0.75",
    "−5",
    "①②③",
    "𝟘𝟙𝟚",
]
SPACES = ["  lots   of   space  ", "\u3000ideographic", "nb\u00a0sp", "em\u2003space", " \t\n ", "", " "]
CONTRACTIONS = [
    "it's",
    "IT'S",
    "don't",
    "We're",
    "they've",
    "I'm",
    "you'll",
    "he'd",
    "dog's",
    "'ſ",
    "'S",
    "rock'n'roll",
    "o'clock",
    "'''",
    "''s",
    "it!'s",
    "ain't",
    "y'all'd've",
]
SPECIAL = [
    "a <|endoftext|> b",
    "<|startoftext|>hello",
    "<|ENDOFTEXT|>",
    "x<|endoftext|>y<|startoftext|>z",
    "<|endoftext",
    "<|endoftext|><|endoftext|>",
]
MOJIBAKE = [
    "cafÃ©",
    "âœ” No problems",
    "Ã¼ber",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "SÃ£o Paulo",
    "Ã¡rbol",
    "â€œquotedâ€\x9d",
    "naÃ¯ve",
    "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "ã‚«ã‚¿ã‚«ãƒŠ",
    "voilÃ le travail",
]


def corpus() -> list[str]:
    rng = random.Random(20261122)
    groups = [
        SCRIPTS,
        EMOJI,
        ACCENTS,
        QUOTES,
        HTML,
        LIGATURES,
        WIDE,
        CONTROL,
        DIGITS,
        SPACES,
        CONTRACTIONS,
        SPECIAL,
        MOJIBAKE,
    ]
    prompts = [p for group in groups for p in group]
    prompts += [f"{s}, {st}" for s in SUBJECTS for st in rng.sample(STYLES, 4)]
    prompts += [t.format(s=rng.choice(SUBJECTS)) for t in A1111 for _ in range(6)]
    for _ in range(650):  # a subject with odd pieces dropped in
        pieces = [rng.choice(SUBJECTS)] + [rng.choice(rng.choice(groups)) for _ in range(rng.randint(1, 3))]
        rng.shuffle(pieces)
        prompts.append(rng.choice([", ", " ", "", "\n"]).join(pieces))
    for _ in range(40):  # over-long prompts, cut at 75 tokens
        prompts.append(", ".join(rng.choice(SUBJECTS + STYLES) for _ in range(rng.randint(20, 45))))
    prompts += [p.upper() for p in rng.sample(prompts, 60)]
    return list(dict.fromkeys(prompts))


def derive_hf_files(folder: Path) -> None:
    """vocab.json and merges.txt as Hugging Face ships them, from OpenAI's merges file."""
    lines = gzip.decompress((ROOT / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [
        chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)
    ]
    tokens = (
        chars
        + [c + "</w>" for c in chars]
        + [m.replace(" ", "") for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def main() -> None:
    import ftfy  # noqa: F401 - the reference must run with ftfy installed
    import transformers
    from transformers import CLIPTokenizer

    assert transformers.__version__ < "5", "transformers 5 has no Python CLIPTokenizer; use transformers<5"
    with tempfile.TemporaryDirectory() as tmp:
        derive_hf_files(Path(tmp))
        tokenizer = CLIPTokenizer(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt")
        assert tokenizer.fix_text is not None, "ftfy was not picked up"
    entries = []
    for prompt in corpus():
        raw = tokenizer.encode(prompt, add_special_tokens=False)
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        entries.append({"prompt": prompt, "ids": ids} | ({"raw": raw} if len(raw) > 75 else {}))
    header = {
        "reference": f"transformers {transformers.__version__} CLIPTokenizer (Python) with ftfy",
        "prompts": len(entries),
    }
    OUT.write_text(json.dumps({"about": header, "entries": entries}, ensure_ascii=True, separators=(",", ":")) + "\n")
    print(f"{len(entries)} prompts -> {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
