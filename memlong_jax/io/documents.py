"""Reading documents for scoring and training: text files, JSONL, directories of them, stdin.

Every problem with the input (a missing path, an empty file, bytes that are not UTF-8, a JSONL
line without the text field) is a `UserError` naming the file, found before any model work.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple

from pydoc_data.topics import topics

from memlong_jax.errors import UserError
from memlong_jax.io.safe_paths import regular_file

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".tex", ".text")   # what a directory walk picks up


class Document(NamedTuple):
    name: str   # file path, `path:line` for JSONL rows, `<stdin>`
    text: str


def decode_utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{name}: not UTF-8 text (invalid byte at offset {err.start})") from None


def jsonl_rows(text: str, name: str):
    """(line number, parsed value) of each non-blank line; bad JSON is a one-line UserError."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{name}:{number}: not valid JSON ({err.msg})") from None


def _jsonl_documents(text: str, name: str, field: str) -> list[Document]:
    documents = []
    for number, row in jsonl_rows(text, name):
        text = row.get(field) if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise UserError(f"{name}:{number}: expected a JSON string or an object with a "
                            f"string field {field!r}")
        if text.strip():
            documents.append(Document(f"{name}:{number}", text))
    return documents


def _file_documents(data: bytes, name: str, jsonl: bool, field: str) -> list[Document]:
    text = decode_utf8(data, name)
    if not text.strip():
        raise UserError(f"{name}: empty input")
    if jsonl:
        documents = _jsonl_documents(text, name, field)
        if not documents:
            raise UserError(f"{name}: no non-empty {field!r} field in any line")
        return documents
    return [Document(name, text)]


def expand_paths(paths: list[str]) -> list[str]:
    """Files named directly (whatever their suffix), `-` (stdin), and the text and JSONL files
    found under directories (recursively, sorted)."""
    files: list[str] = []
    for path in paths:
        if path == "-" or os.path.isfile(path):
            files.append(path)
        elif os.path.exists(path) and not os.path.isdir(path):
            regular_file(path, "input")
        elif os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names if not name.startswith(".")
                           and name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
            if not found:
                raise UserError(f"{path}: directory holds no text files "
                                f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})")
            files += [regular_file(f, "input") for f in found]
        else:
            raise UserError(f"{path}: no such file or directory")
    return files


def file_documents(path: str, text_field: str = "text") -> list[Document]:
    """The documents of one file (`.jsonl`/`.json`: one per line) or of stdin (`-`, text)."""
    if path == "-":
        return _file_documents(sys.stdin.buffer.read(), "<stdin>", False, text_field)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    return _file_documents(data, path, path.lower().endswith(JSONL_SUFFIXES), text_field)


def read_documents(paths: list[str], text_field: str = "text") -> list[Document]:
    """All documents of `paths` (see `expand_paths`): one per text file or JSONL line."""
    return [doc for file in expand_paths(paths) for doc in file_documents(file, text_field)]


def pydoc_text() -> str:
    """Python's bundled reference documentation: real English present on every machine."""
    return "".join(topics[key] for key in sorted(topics))
