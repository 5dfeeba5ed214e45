"""Reading the documents a user wants scored: text files, JSONL, directories of them, or stdin.

Every problem with the input (a missing path, an empty file, bytes that are not UTF-8, a JSONL
line without the text field) is a `UserError` naming the file, found before any model work.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple

from memlong_jax.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")


class Document(NamedTuple):
    name: str   # file path, `path:line` for JSONL rows, `<stdin>`
    text: str


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{name}: not UTF-8 text (invalid byte at offset {err.start})") from None


def _jsonl_documents(text: str, name: str, field: str) -> list[Document]:
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{name}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UserError(f"{name}:{number}: no string field {field!r}")
        if row[field].strip():
            documents.append(Document(f"{name}:{number}", row[field]))
    return documents


def _file_documents(data: bytes, name: str, jsonl: bool, field: str) -> list[Document]:
    text = _decode(data, name)
    if not text.strip():
        raise UserError(f"{name}: empty input")
    if jsonl:
        documents = _jsonl_documents(text, name, field)
        if not documents:
            raise UserError(f"{name}: no non-empty {field!r} field in any line")
        return documents
    return [Document(name, text)]


def _expand(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names if not name.startswith("."))
        if not files:
            raise UserError(f"{path}: directory has no files")
        return files
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or directory")
    return [path]


def read_documents(paths: list[str], text_field: str = "text") -> list[Document]:
    """`paths`: files (`.jsonl`/`.json` are JSON lines, anything else plain text), directories
    (read recursively, sorted) or `-` for stdin (plain text). One document per text file or
    JSONL line."""
    documents: list[Document] = []
    for path in paths:
        if path == "-":
            documents += _file_documents(sys.stdin.buffer.read(), "<stdin>", False, text_field)
            continue
        for file in _expand(path):
            with open(file, "rb") as f:
                data = f.read()
            documents += _file_documents(data, file, file.endswith(JSONL_SUFFIXES), text_field)
    return documents
