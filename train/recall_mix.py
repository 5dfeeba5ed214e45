"""Training data that needs memory (issue 15, item 2): recall episodes in the training streams.

Each stream's micro-steps are grouped into episodes of `episode_blocks` consecutive blocks. A
`fraction` of the episodes, drawn from the seed, the stream and the episode's number, become
recall episodes: the stream's own blocks for those steps (real training text, so no text is
skipped), with something stated in the earlier blocks and needed again in the last one, where
the local window cannot see it and only memory can bring it back:

- repeat: a passage of the episode's earlier blocks comes back in the last block;
- facts: a few "name -> number" statements in the earlier blocks, asked in the last block;
- passkey: one number to remember at a random depth, asked at the very end.

The wording, the filler (real training text) and the books are not those of the evaluation
(`memlong_jax.eval.recall.prompts`), which stays held out. A block is a pure function of
(seed, stream, micro-step), so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

KINDS = ("repeat", "facts", "passkey")

# (statement, question + answer): {v} is the number, {name} a made-up name.
CODE_LINES = (
    ("Code word: {v}. Keep {v} in mind.", "Earlier a code word was given. The code word was {v}."),
    ("Note the secret number {v} for later.", "The secret number noted earlier was {v}."),
    ("Write this down: the combination is {v}.", "What was the combination? It was {v}."),
)
FACT_LINES = (
    ("{name}'s locker number is {v}.", "Question: what is {name}'s locker number? Answer: {v}."),
    ("{name} lives in room {v}.", "In which room does {name} live? In room {v}."),
    ("The ticket of {name} carries the number {v}.",
     "Which number was on {name}'s ticket? It was {v}."),
)
SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "vas", "el", "dor", "phi", "sa", "nor", "bi", "qua",
             "zel", "te", "om", "gri", "ash", "un", "ves")


def _name(rng) -> str:
    return "".join(SYLLABLES[i] for i in rng.integers(len(SYLLABLES), size=rng.integers(2, 4))
                   ).capitalize()


def _number(rng) -> str:
    return str(int(rng.integers(10 ** int(rng.integers(2, 6)), 10 ** 6)))


class RecallMix:
    """Recall episodes over a stream layout; `block(row, micro, real)` gives what the stream reads
    at micro-step `micro` (`real(micro)`: the stream's own block there, `[seq_len]`). Settings
    are checked by `train.config.validate` (episode_blocks >= 2, kinds from KINDS)."""

    def __init__(self, tokenizer, seq_len: int, fraction: float, episode_blocks: int, seed: int,
                 kinds=KINDS):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.fraction, self.episode_blocks, self.seed = fraction, episode_blocks, seed
        self.kinds = tuple(kinds)
        self._cache: dict = {}

    def rng(self, row: int, episode: int, purpose: int):
        return np.random.default_rng([self.seed, purpose, row, episode])

    def kind(self, row: int, episode: int) -> str | None:
        """The episode's recall kind, or None for plain text."""
        rng = self.rng(row, episode, 0)
        if rng.random() >= self.fraction:
            return None
        return self.kinds[int(rng.integers(len(self.kinds)))]

    def block(self, row: int, micro: int, real) -> np.ndarray:
        episode, part = divmod(micro, self.episode_blocks)
        kind = self.kind(row, episode)
        if kind is None:
            return real(micro)
        if (row, episode) not in self._cache:
            if len(self._cache) >= 64:
                self._cache.clear()
            start = episode * self.episode_blocks
            tokens = np.concatenate([np.asarray(real(start + i))
                                     for i in range(self.episode_blocks)])
            self._cache[row, episode] = self._episode(row, episode, kind, tokens)
        return self._cache[row, episode][part * self.seq_len:(part + 1) * self.seq_len]

    def _episode(self, row: int, episode: int, kind: str, tokens: np.ndarray) -> np.ndarray:
        tokens = tokens.copy()
        rng = self.rng(row, episode, 1)
        last = (self.episode_blocks - 1) * self.seq_len      # where the last block starts
        if kind == "repeat":
            size = int(rng.integers(self.seq_len // 8, self.seq_len // 2 + 1))
            source = int(rng.integers(0, last - size + 1))
            target = int(rng.integers(last, len(tokens) - size + 1))
            tokens[target:target + size] = tokens[source:source + size].copy()
            return tokens
        if kind == "passkey":
            statement, question = CODE_LINES[int(rng.integers(len(CODE_LINES)))]
            pairs = [(statement, question, {"v": _number(rng)})]
        else:
            pairs = [(*FACT_LINES[int(rng.integers(len(FACT_LINES)))],
                      {"v": _number(rng), "name": _name(rng)})
                     for _ in range(int(rng.integers(2, 5)))]
        said = self._encode([" " + s.format(**v) + " " for s, _, v in pairs])
        asked = self._encode([" " + q.format(**v) + " " for _, q, v in pairs])
        # Statements in separate slices of the earlier blocks, questions in separate slices of
        # the last block (the passkey's at the very end).
        def place(pieces, lo, hi, at_end):
            room = (hi - lo) // len(pieces)
            for i, ids in enumerate(pieces):
                start, stop = lo + i * room, lo + (i + 1) * room
                at = stop - len(ids) if at_end else \
                    int(rng.integers(start, max(start, stop - len(ids)) + 1))
                _paste(tokens, ids, at)

        place(said, 0, last, False)
        place(asked, last, len(tokens), kind == "passkey")
        return tokens

    def _encode(self, texts) -> list[np.ndarray]:
        return [np.asarray(ids, np.int64) for ids in self.tokenizer.encode_batch(texts)]


def _paste(tokens: np.ndarray, ids: np.ndarray, at: int) -> None:
    """Overwrite tokens from `at` with `ids` (cut at the end of `tokens`)."""
    at = max(0, at)
    ids = ids[:len(tokens) - at]
    tokens[at:at + len(ids)] = ids
