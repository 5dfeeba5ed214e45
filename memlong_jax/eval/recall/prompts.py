"""The recall tasks' inputs, built as token ids of an exact length with the model's tokenizer.

Every prompt is a concatenation of separately tokenized pieces, so its length and the depth of
what it hides are exact in tokens; the text the model reads is `tokenizer.decode(ids)`. Pieces
meet at word boundaries, where a byte-level BPE (SmolLM2's) tokenizes the joined text the same
way (`tests/test_recall.py` checks the round trip on SmolLM2's tokenizer).

- passkey (landmark attention's format): intro, filler, the key line at the requested depth of
  the filler, filler, the question; lines joined by "\\n" (an empty filler part is left out).
- needle: real text with one factual sentence inserted at the requested depth (moved back to
  the nearest sentence start), then a blank line and the question.
- repeat: real text whose first `passage` tokens come back at the end, after the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from memlong_jax.errors import UserError

TASKS = ("passkey", "needle", "repeat")

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

# (fact, question): the question ends right before the answer, which is " " + a VALUES word.
NEEDLES = (
    ("The secret ingredient of Grandma Ivy's soup is {value}.",
     "What is the secret ingredient of Grandma Ivy's soup? The secret ingredient of Grandma "
     "Ivy's soup is"),
    ("The password of the old lighthouse is {value}.",
     "What is the password of the old lighthouse? The password of the old lighthouse is"),
    ("Captain Morrow buried the treasure under the {value}.",
     "Where did Captain Morrow bury the treasure? Captain Morrow buried the treasure under the"),
)
VALUES = ("lavender", "cinnamon", "marble", "copper", "violet", "saffron", "granite", "walnut",
          "amber", "juniper", "cobalt", "thistle", "pepper", "willow", "velvet", "coral")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input of a task at one length and depth.

    ids        int32 `[n]`: the prompt (passkey, needle: n = length - answer budget) or the whole
               sequence (repeat: n = length)
    answer     the expected answer text (passkey: the key; needle: the value; repeat: "")
    answer_ids the answer's tokens as they follow the prompt (" " + answer)
    position   token index in `ids` where the hidden line starts (repeat: the second copy)
    """

    task: str
    length: int
    depth: float
    index: int
    ids: np.ndarray
    answer: str = ""
    answer_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    position: int = 0


def item_rng(seed: int, task: str, length: int, depth: float, index: int):
    """The same draw for a cell in every run, whatever else runs beside it."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length,
                                  int(round(depth * 1000)), index])


def encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


@functools.lru_cache(maxsize=8)
def _filler_period(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    return encode(tokenizer, FILLER), encode(tokenizer, " " + FILLER)


def filler_tokens(tokenizer, n: int) -> np.ndarray:
    """The first n tokens of FILLER repeated, joined by spaces."""
    first, again = _filler_period(tokenizer)
    reps = max(0, -(-(n - len(first)) // len(again)))
    return np.concatenate([first, *([again] * reps)])[:n]


def _join_lines(tokenizer, parts) -> np.ndarray:
    """Parts (a string or token ids) joined by "\\n", empty ones left out."""
    newline = encode(tokenizer, "\n")
    out = []
    for part in parts:
        ids = encode(tokenizer, part) if isinstance(part, str) else part
        if len(ids):
            out += [newline, ids] if out else [ids]
    return np.concatenate(out).astype(np.int32)


def passkey(tokenizer, prompt_tokens: int, depth: float, key: int, length: int = 0,
            index: int = 0) -> Item:
    """The landmark-attention prompt of exactly `prompt_tokens` tokens with the key line after
    round(depth * F) of its F filler tokens."""
    fixed = len(_join_lines(tokenizer, [INTRO, KEY_LINE.format(key=key), QUESTION]))
    newline = len(encode(tokenizer, "\n"))
    filler = prompt_tokens - fixed - 2 * newline
    if filler < 0:
        raise UserError(f"a passkey prompt needs more than {fixed + 2 * newline} tokens, "
                        f"got {prompt_tokens}")
    before = int(round(depth * filler))
    after = filler - before
    # An empty filler part drops its line break: give that break to the other part.
    before, after = (before + newline, after) if after == 0 else \
        (before, after + newline) if before == 0 else (before, after)
    before, after = (filler_tokens(tokenizer, before), filler_tokens(tokenizer, after))
    head = _join_lines(tokenizer, [INTRO, before])
    ids = _join_lines(tokenizer, [INTRO, before, KEY_LINE.format(key=key), after, QUESTION])
    assert len(ids) == prompt_tokens, (len(ids), prompt_tokens)
    return Item("passkey", length, depth, index, ids, str(key), encode(tokenizer, f" {key}"),
                len(head) + newline)


def passkey_item(tokenizer, prompt_tokens: int, depth: float, seed: int, length: int,
                 index: int) -> Item:
    key = int(item_rng(seed, "passkey", length, depth, index).integers(10000, 100000))
    return passkey(tokenizer, prompt_tokens, depth, key, length, index)


class Haystack:
    """Real text to hide things in: the documents joined by blank lines, read as a ring."""

    def __init__(self, tokenizer, texts):
        self.tokenizer = tokenizer
        self.text = "\n\n".join(t.strip() for t in texts if t.strip())
        if len(self.text) < 1000:
            raise UserError("the haystack text is too short: give at least a few pages of text")

    def span(self, rng, tokens: int):
        """(text, encoding) of at least `tokens` tokens starting at a random word boundary."""
        start = int(rng.integers(len(self.text)))
        chars = 8 * tokens + 64
        while True:
            ring = (self.text + "\n\n") * (1 + (start + chars) // len(self.text))
            piece = ring[start:start + chars]
            cut = next((i for i, c in enumerate(piece) if c.isspace()), 0)
            piece = piece[cut:].lstrip()
            encoding = self.tokenizer.encode(piece, add_special_tokens=False)
            if len(encoding.ids) >= tokens:
                return piece, encoding
            chars *= 2

    def tokens(self, rng, n: int) -> np.ndarray:
        return np.asarray(self.span(rng, n)[1].ids[:n], np.int32)


def sentence_start(text: str, offsets, k: int, reach: int = 256) -> int:
    """The token index at or before k that starts a sentence (after ., ! or ?, at a space),
    searching back `reach` tokens; else the nearest word start at or before k; else k."""
    def starts_word(j):
        return 0 < j < len(offsets) and text[offsets[j][0]].isspace()

    for j in range(k, max(k - reach, 0), -1):
        before = text[:offsets[j][0]].rstrip().rstrip("\"'\u201d\u2019)")
        if starts_word(j) and before.endswith((".", "!", "?")):
            return j
    return next((j for j in range(k, max(k - reach, 0), -1) if starts_word(j)), k)


def needle_item(tokenizer, haystack: Haystack, prompt_tokens: int, depth: float, seed: int,
                length: int, index: int) -> Item:
    rng = item_rng(seed, "needle", length, depth, index)
    fact, question = NEEDLES[int(rng.integers(len(NEEDLES)))]
    value = VALUES[int(rng.integers(len(VALUES)))]
    fact_ids = encode(tokenizer, " " + fact.format(value=value))
    question_ids = encode(tokenizer, "\n\n" + question)
    text_tokens = prompt_tokens - len(fact_ids) - len(question_ids)
    if text_tokens < 1:
        raise UserError(f"a needle prompt needs more than {prompt_tokens - text_tokens} tokens, "
                        f"got {prompt_tokens}")
    text, encoding = haystack.span(rng, text_tokens)
    ids = np.asarray(encoding.ids[:text_tokens], np.int32)
    k = sentence_start(text, encoding.offsets, int(round(depth * text_tokens)))
    if k == 0:   # the text starts without a space: the fact ends its own line instead
        fact_ids = encode(tokenizer, " " + fact.format(value=value) + "\n")
        ids = ids[:prompt_tokens - len(fact_ids) - len(question_ids)]
    return Item("needle", length, depth, index,
                np.concatenate([ids[:k], fact_ids, ids[k:], question_ids]).astype(np.int32),
                value, encode(tokenizer, " " + value), k)


def repeat_item(tokenizer, haystack: Haystack, length: int, passage: int, seed: int,
                index: int) -> Item:
    """`length - passage` tokens of real text, then its first `passage` tokens again."""
    if length < 2 * passage:
        raise UserError(f"repeat needs lengths of at least twice the passage ({2 * passage} "
                        f"tokens), got {length}")
    text = haystack.tokens(item_rng(seed, "repeat", length, 0.0, index), length - passage)
    return Item("repeat", length, 0.0, index, np.concatenate([text, text[:passage]]),
                position=length - passage)
