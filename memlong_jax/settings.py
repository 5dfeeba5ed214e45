"""Settings plumbing shared by every config dataclass (model, MemLong, block memory, training).

A field declared with `setting(...)` carries its help text, its allowed values and its least
value in the dataclass metadata; `apply_overrides` is the one `key=value` parser of every
command, `check` enforces what the metadata says and `describe` writes the `--help` table, so
each fact about a setting is written once, next to the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
from collections.abc import Mapping

from memlong_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A setting that cannot describe a model or a run we can build."""


class Config:
    """What every frozen config dataclass shares: `replace` (a copy with some fields changed,
    checked again by the class's `__post_init__` when it has one)."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def setting(default=dataclasses.MISSING, *, help: str, choices=None, least: int | None = None):
    """A dataclass field whose metadata holds its `--help` text, its allowed values (`choices`)
    and, for an integer, the least value it may take (`least`)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if least is not None:
        metadata["least"] = least
    return dataclasses.field(default=default, metadata=metadata)


def defaults(cls) -> dict:
    """The fields of config class `cls` that have a default, with it."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


def choices(cls, name: str) -> tuple:
    """The allowed values of field `name` of the config class `cls`."""
    return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)


def parse_value(key: str, field: dataclasses.Field, current, text: str):
    """A `key=value` string parsed by the type of the setting's current value: bool, int,
    float, a tuple of ints (`13,17,21`), else the string itself; then checked against the
    field's allowed values."""
    if isinstance(current, bool):
        if text.lower() not in BOOL_WORDS:
            raise ConfigError(f"{key} needs true or false, got {text!r}")
        return BOOL_WORDS[text.lower()]
    value = text
    kinds = [(tuple, "an integer list", lambda v: tuple(int(x) for x in v.split(",") if x.strip())),
             (int, "an integer", int), (float, "a number", float)]
    for kind, words, parse in kinds:
        if isinstance(current, kind):
            try:
                value = parse(text)
            except ValueError:
                raise ConfigError(f"{key} needs {words}, got {text!r}") from None
            break
    _check_choice(key, field, value)
    return value


def apply_overrides(parts, assignments):
    """`key=value` strings applied to frozen config dataclasses.

    `parts` is one config, or a mapping from a prefix to a config (`''` for keys without a
    prefix: `{"": train, "memlong": memlong}` takes `lr=1e-3` and `memlong.top_k=4`); the
    result has the same shape. Unknown keys, keys given twice and values that do not parse or
    are not allowed are `ConfigError`s of one line.
    """
    single = dataclasses.is_dataclass(parts)
    tree: dict = {"": parts} if single else dict(parts)
    fields = {(f"{prefix}.{f.name}" if prefix else f.name): (prefix, f)
              for prefix, config in tree.items() for f in dataclasses.fields(config)}
    changes: dict = {prefix: {} for prefix in tree}
    seen: set[str] = set()
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad setting {item!r}: expected key=value")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting {key!r}{hint}; see --help for the keys")
        if key in seen:
            raise ConfigError(f"setting {key!r} given twice")
        seen.add(key)
        prefix, field = fields[key]
        changes[prefix][field.name] = parse_value(key, field, getattr(tree[prefix], field.name),
                                                  text.strip())
    result = {prefix: dataclasses.replace(config, **changes[prefix]) if changes[prefix]
              else config for prefix, config in tree.items()}
    return result[""] if single else result


def check(config, what: str = "") -> None:
    """Raise `ConfigError` on the first field of `config` outside its allowed values or below
    its least value (`what` prefixes the setting's name in the message)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        _check_choice(what + field.name, field, value)
        least = field.metadata.get("least")
        if least is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < least):
            raise ConfigError(f"{what}{field.name} must be an integer >= {least}, got {value!r}")


def _check_choice(key: str, field: dataclasses.Field, value) -> None:
    allowed = field.metadata.get("choices")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def describe(configs, prefix: str = "") -> list[str]:
    """`--help` lines for the fields of a config class: each key, its value in `configs` (a
    list of instances, e.g. one per preset: one value when all agree, else each joined by
    ` | `; a class alone shows none), its help text and its allowed values."""
    instances = [] if isinstance(configs, type) else list(configs)
    cls = configs if isinstance(configs, type) else type(instances[0])
    lines = []
    for field in dataclasses.fields(cls):
        values = [repr(getattr(c, field.name)) for c in instances]
        shown = values[:1] if len(set(values)) == 1 else values
        lines.append(f"  {prefix}{field.name}" + (f" = {' | '.join(shown)}" if shown else ""))
        allowed = field.metadata.get("choices")
        text = field.metadata.get("help", "") + (
            f" (one of: {', '.join(map(str, allowed))})" if allowed else "")
        lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False, break_long_words=False)
    return lines

