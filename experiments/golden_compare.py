"""Compare two golden-output directories written by experiments/golden.sh.

    python experiments/golden_compare.py BEFORE AFTER

Numbers that measure the run rather than the model (timings, dates, paths, versions) are
ignored; everything else (NLLs, perplexities, tokens, losses, generated text) must be equal.
Prints one line per file and exits 1 if any differs.
"""

from __future__ import annotations

import json
import os
import re
import sys

IGNORED_KEY = re.compile(r"seconds|date|time|per_s|_s$|_path|versions|tflops|mfu|elapsed|wall|"
                         r"^inputs$|^output_dir$|^cache_dir$|^data$")
TIMING_TEXT = re.compile(r"\d+(\.\d+)?\s*(s|ms|it/s|tok/s)\b|\(.*?incl\..*?\)")


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not IGNORED_KEY.search(k)}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def load(path: str):
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [strip(json.loads(line)) for line in f if line.strip()]
        if path.endswith(".json"):
            return strip(json.load(f))
        text = f.read().replace(os.path.dirname(os.path.abspath(path)), "<out>")
        return TIMING_TEXT.sub("<t>", text)


def diff(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        return out + [d for k in sorted(set(a) & set(b)) for d in diff(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"]


def main() -> int:
    before, after = sys.argv[1:3]
    bad = 0
    for name in sorted(os.listdir(before)):
        path = os.path.join(before, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        if name.endswith(".txt") and os.path.isfile(path[:-4] + ".json"):
            continue   # a printed table of the JSON's rows, with timings in its columns
        other = os.path.join(after, name)
        if not os.path.isfile(other):
            print(f"{name}: missing in {after}")
            bad += 1
            continue
        found = diff(load(path), load(other))
        print(f"{name}: {'identical' if not found else f'{len(found)} differences'}")
        for line in found[:5]:
            print(f"  {line}")
        bad += bool(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
