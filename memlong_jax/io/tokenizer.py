"""The LM's tokenizer: `tokenizer.json` of a checkpoint directory, as a `tokenizers.Tokenizer`."""

from __future__ import annotations

import os

from tokenizers import Tokenizer


def load_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer saved in directory `path`, or None when it has none."""
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        return None
    return Tokenizer.from_file(tokenizer_file)
