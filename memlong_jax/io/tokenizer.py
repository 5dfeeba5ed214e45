"""The LM's tokenizer: `tokenizer.json` of a checkpoint directory, as a `tokenizers.Tokenizer`."""

from __future__ import annotations

from tokenizers import Tokenizer

from memlong_jax.errors import UserError
from memlong_jax.io.safe_paths import contained_file, regular_file


def load_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer saved in directory `path`, or None when it has none; its `tokenizer.json`
    must be a regular file inside `path`."""
    tokenizer_file = contained_file(path, "tokenizer.json", "tokenizer file")
    return None if tokenizer_file is None else read_tokenizer(tokenizer_file)


def read_tokenizer(tokenizer_file: str) -> Tokenizer:
    """A `tokenizer.json`; a damaged one is a one-line `UserError`."""
    try:
        return Tokenizer.from_file(regular_file(tokenizer_file, "tokenizer file"))
    except UserError:
        raise
    except Exception as err:  # tokenizers raises a bare Exception on bad files
        raise UserError(f"{tokenizer_file}: not a valid tokenizer.json ({err})") from None
