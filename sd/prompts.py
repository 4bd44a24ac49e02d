"""Prompts as AUTOMATIC1111's web UI reads them, number for number: emphasis, long prompts and BREAK, prompt editing
and alternation, and AND.

    parse_emphasis("a (red:1.3) circle")      [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]
    schedule("a [cat:dog:0.5]", 10)           [(5, "a cat"), (10, "a dog")]
    split_and("a cat AND a dog:0.5")          [("a cat", 1.0), (" a dog", 0.5)]
    encode_prompt(models, "a (red:1.3) ...")  the context [1, 77 k, width]: k chunks of 75 tokens, each framed and
                                              encoded by CLIP on its own, scaled by the emphasis weights
    load_embeddings(models, "embeddings/")    textual inversion (sd/embeddings.py), used by trigger word

`python -m sd.prompts "a (red:1.3) circle BREAK on blue"` prints what each step makes of a prompt.
"""

import argparse
import re
from dataclasses import dataclass, field

import torch

from sd.embeddings import load_embeddings
from sd.model_loader import load_models
from sd.models import Models

__all__ = ["chunks", "encode_prompt", "explain", "load_embeddings", "parse_emphasis", "schedule", "split_and"]

CHUNK = 75  # prompt tokens per CLIP pass: 77 positions less the start and end tokens
EMPHASIS = ("original", "no_norm", "none")

# -- emphasis -------------------------------------------------------------------------------------------------------

# One token of the emphasis syntax each: an escaped character, an opening bracket, a weight closing a round bracket,
# a closing bracket, a run of plain text, or a lone colon.
EMPHASIS_TOKEN = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Text -> (fragment, weight) pairs, as A1111's parse_prompt_attention: `(x)` is x at 1.1, `[x]` at 1 / 1.1,
    `(x:w)` at w, nesting multiplies, unclosed brackets close at the end, `\\(` and the like are literal characters,
    a BREAK between words is ("BREAK", -1), and neighbours of equal weight merge. A weight A1111 cannot read as a
    number (`(a:1.2.3)`) stays text here, where A1111 fails."""
    fragments: list[list] = []  # [text, weight], weights multiplied as brackets close
    open_round: list[int] = []  # where each open bracket's fragments begin
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token in "([":
            (open_round if token == "(" else open_square).append(len(fragments))
        elif weight is not None and open_round and number(weight) is not None:
            multiply_from(open_round.pop(), number(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK.split(token)):
                fragments += [["BREAK", -1.0]] * (i > 0) + [[part, 1.0]]
    for start in open_round:
        multiply_from(start, ROUND)
    for start in open_square:
        multiply_from(start, SQUARE)

    merged = [fragments[0]] if fragments else [["", 1.0]]
    for text_, weight in fragments[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight])
    return [(text_, weight) for text_, weight in merged]


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# -- AND ------------------------------------------------------------------------------------------------------------

AND = re.compile(r"\bAND\b")
TRAILING_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable-diffusion split: the sub-prompts between ANDs, each with the weight of a trailing
    `:number` (1 without). Like A1111, a prompt without AND that ends in `:number` is weighted too."""
    parts = []
    for part in AND.split(prompt):
        text, weight = TRAILING_WEIGHT.match(part).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


# -- prompt editing and alternation ----------------------------------------------------------------------------------
#
# A1111's grammar (a lark grammar there; parsed here by recursive descent with backtracking):
#   start:      (prompt | any of "[]():" as text)*
#   prompt:     (emphasized | scheduled | alternate | plain | whitespace)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"        (kept as text)
#   scheduled:  "[" [prompt ":"] prompt ":" [whitespace] NUMBER [whitespace] "]"
#   alternate:  "[" prompt ("|" [prompt])+ "]"
#   plain:      (any character but \ [ ] ( ) : |, or \ and any character)+
# A prompt that does not parse is used as it is, for every step.

SIGNED_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
WHITESPACE = re.compile(r"\s+")


class Unparsed(Exception):
    pass


@dataclass
class Scheduled:
    before: list | None
    after: list
    when: str  # the number as written: "0.5", "5", "1e1"


@dataclass
class Alternate:
    options: list[list]


@dataclass
class Parser:
    text: str
    pos: int = 0
    budget: int = 100_000  # attempts before a pathological prompt is given up (and used as text)

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise Unparsed
        self.pos += 1

    def attempt(self, rule):
        """rule() from here, or (None, position unchanged) if it does not match."""
        start = self.pos
        self.budget -= 1
        if self.budget < 0:
            raise Unparsed
        try:
            return rule()
        except Unparsed:
            self.pos = start
            return None

    def start(self) -> list:
        items = []
        while self.pos < len(self.text):
            char = self.peek()
            if char in "([" and (node := self.attempt(self.bracketed)) is not None:
                items.append(node)
            elif char in "[]():":
                items.append(char)
                self.pos += 1
            elif match := PLAIN.match(self.text, self.pos):
                items.append(match.group(0))
                self.pos = match.end()
            else:
                raise Unparsed  # a "|" outside brackets, or a lone backslash at the end
        return items

    def prompt(self) -> list:
        items = []
        while self.pos < len(self.text):
            char = self.peek()
            if char in "([":
                items.append(self.bracketed())
            elif match := PLAIN.match(self.text, self.pos):
                items.append(match.group(0))
                self.pos = match.end()
            else:
                break
        return items

    def bracketed(self):
        if self.peek() == "(":
            return self.emphasized_round()
        for rule in (self.scheduled, self.alternate, self.emphasized_square):
            if (node := self.attempt(rule)) is not None:
                return node
        raise Unparsed

    def emphasized_round(self) -> list:
        self.expect("(")
        inner = self.prompt()
        if self.peek() == ":":
            self.pos += 1
            inner = [*inner, ":", *self.prompt()]
        self.expect(")")
        return ["(", *inner, ")"]

    def emphasized_square(self) -> list:
        self.expect("[")
        inner = self.prompt()
        self.expect("]")
        return ["[", *inner, "]"]

    def scheduled(self) -> Scheduled:
        self.expect("[")
        first = self.prompt()
        self.expect(":")
        when = self.attempt(self.number_and_close)
        if when is not None:
            return Scheduled(None, first, when)
        second = self.prompt()
        self.expect(":")
        return Scheduled(first, second, self.number_and_close())

    def number_and_close(self) -> str:
        self.skip_whitespace()
        match = SIGNED_NUMBER.match(self.text, self.pos)
        if not match:
            raise Unparsed
        self.pos = match.end()
        self.skip_whitespace()
        self.expect("]")
        return match.group(0)

    def skip_whitespace(self) -> None:
        if match := WHITESPACE.match(self.text, self.pos):
            self.pos = match.end()

    def alternate(self) -> Alternate:
        self.expect("[")
        options = [self.prompt()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.prompt())
        if len(options) < 2:
            raise Unparsed
        self.expect("]")
        return Alternate(options)


def edit_step(when: str, steps: int) -> int:
    """The step an edit happens after: a number with "." is a fraction of the steps, one without a step count."""
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def text_at(items: list, step: int, steps: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Scheduled):
            chosen = item.before if step <= edit_step(item.when, steps) else item.after
            out.append(text_at(chosen or [], step, steps))
        elif isinstance(item, Alternate):
            out.append(text_at(item.options[(step - 1) % len(item.options)], step, steps))
        else:
            out.append(text_at(item, step, steps))
    return "".join(out)


def change_steps(items: list, steps: int) -> set[int]:
    found = set()
    for item in items:
        if isinstance(item, Scheduled):
            if (step := edit_step(item.when, steps)) >= 1:
                found.add(step)
            found |= change_steps(item.before or [], steps) | change_steps(item.after, steps)
        elif isinstance(item, Alternate):
            found |= set(range(1, steps + 1))
            for option in item.options:
                found |= change_steps(option, steps)
        elif isinstance(item, list):
            found |= change_steps(item, steps)
    return found


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt-edit schedule of one AND-free prompt: [(last step, text)], the text to use up to and including
    each step (counted from 1), in order. `[a:b:when]` is a until `when`, then b; `[a:when]`, `[a::when]` add and
    remove; `[a|b]` alternates every step."""
    try:
        tree = Parser(prompt).start()
    except Unparsed:
        return [(steps, prompt)]
    return [(step, text_at(tree, step, steps)) for step in sorted(change_steps(tree, steps) | {steps})]


# -- tokens and chunks --------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """75 token ids (padded with the end token) and their emphasis weights, before framing; `embeddings`: where a
    textual-inversion embedding's vectors go (position, trigger word)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list[tuple[int, str]] = field(default_factory=list)

    def split(self, at: int) -> "Chunk":
        """Cuts this chunk at `at` and returns what was after it."""
        rest = Chunk(self.tokens[at:], self.weights[at:], [(p - at, name) for p, name in self.embeddings if p >= at])
        self.tokens, self.weights = self.tokens[:at], self.weights[:at]
        self.embeddings = [(p, name) for p, name in self.embeddings if p < at]
        return rest


def chunks(models: Models, prompt: str, emphasis: str = "original", comma_backtrack: int = 20) -> list[Chunk]:
    """The prompt's tokens in chunks of 75, as A1111 packs them: fragment by fragment; BREAK closes a chunk; when
    a chunk is full, the words after its last comma move to the next one if that comma is among its last
    `comma_backtrack` tokens; an embedding's trigger word takes its n vectors' slots, all in one chunk."""
    tokenizer = models.tokenizer
    comma = tokenizer.vocab[",</w>"]
    triggers = [(tokenizer.encode(name), name) for name in models.embeddings]
    triggers = sorted(((ids, name) for ids, name in triggers if ids), key=lambda t: -len(t[0]))  # longest first
    fragments = parse_emphasis(prompt) if emphasis != "none" else [(prompt, 1.0)]
    done: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        padding = CHUNK - len(chunk.tokens)
        done.append(
            Chunk(chunk.tokens + [tokenizer.end_id] * padding, chunk.weights + [1.0] * padding, chunk.embeddings)
        )
        chunk, last_comma = Chunk(), -1

    for text, weight in fragments:
        if text == "BREAK" and weight == -1:
            close()
            continue
        tokens, position = tokenizer.encode(text), 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= comma_backtrack:
                moved = chunk.split(last_comma + 1)
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                close()
            ids, name = next(((i, n) for i, n in triggers if tokens[position : position + len(i)] == i), ([], None))
            if name is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            slots = len(models.embeddings[name])
            if len(chunk.tokens) + slots > CHUNK:
                close()
            chunk.embeddings.append((len(chunk.tokens), name))
            chunk.tokens += [0] * slots  # placeholders: the embedding's vectors replace theirs
            chunk.weights += [weight] * slots
            position += len(ids)
    if chunk.tokens or not done:
        close()
    return done


def encode_prompt(models: Models, prompt: str, clip_skip: int = 1, emphasis: str = "original") -> torch.Tensor:
    """One prompt (without AND or edits) -> its context [1, 77 k, width]: each chunk framed by the start and end
    tokens, through CLIP on its own, then weighted: "original" (A1111's default) multiplies each token's vector by
    its weight and rescales the chunk to its mean before weighting; "no_norm" only multiplies; "none" reads brackets
    as text."""
    if emphasis not in EMPHASIS:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS)}, got {emphasis!r}")
    tokenizer, device = models.tokenizer, models.clip.embeddings.token_embedding.weight.device
    pieces = []
    for chunk in chunks(models, prompt, emphasis):
        tokens = torch.tensor([[tokenizer.start_id, *chunk.tokens, tokenizer.end_id]], device=device)
        vectors = None
        if chunk.embeddings:
            vectors = models.clip.embeddings.token_embedding(tokens).clone()  # [1, 77, width]
            for position, name in chunk.embeddings:
                embedding = models.embeddings[name].to(vectors)
                vectors[0, 1 + position : 1 + position + len(embedding)] = embedding
        z = models.clip(tokens, clip_skip=clip_skip, token_vectors=vectors)  # [1, 77, width]
        weights = torch.tensor([1.0, *chunk.weights, 1.0], device=device, dtype=z.dtype)
        if not torch.all(weights == 1):
            weighted = z * weights[None, :, None]
            z = weighted * (z.mean() / weighted.mean()) if emphasis == "original" else weighted
        pieces.append(z)
    return torch.cat(pieces, dim=1)


def explain(models: Models, prompt: str, steps: int = 20) -> str:
    """What each step makes of a prompt, as text: the AND split, the edit schedule, the emphasis fragments and the
    token chunks of each text."""
    lines = []
    for sub, weight in split_and(prompt):
        lines.append(f"sub-prompt {sub!r}, weight {weight:g}")
        for end, text in schedule(sub, steps):
            lines.append(f"  up to step {end} of {steps}: {text!r}")
            lines += [f"    {weight_:>6.3f}  {fragment!r}" for fragment, weight_ in parse_emphasis(text)]
            for k, chunk in enumerate(chunks(models, text)):
                used = [t for t in chunk.tokens if t != models.tokenizer.end_id]
                lines.append(f"    chunk {k}: {len(used)} tokens: {models.tokenizer.decode(used)!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd.prompts", description="How sd reads a prompt, step by step.")
    parser.add_argument("prompt")
    parser.add_argument("--steps", type=int, default=20, help="for the edit schedule (default 20)")
    args = parser.parse_args(argv)
    print(explain(load_models(), args.prompt, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
