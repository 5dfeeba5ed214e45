"""Why the trained 60-step MemLong misses the pass key at 4k, depth 50% (issue 15), and which
evaluation-side settings change that. Three measurements, each on passkey items built exactly
as the recall evaluation builds them (`prompts.passkey_item`, seed, index 0):

  probe  per item: (c) the layout: where the key's digits sit relative to chunks (tau), the
         ingestion windows that compute their K/V (`prefix_context=window`: the prefix runs in
         local-window segments whose first token sits at position 1) and the local window;
         (a) retrieval: the chunks the answer's `segment` query picks (searched picks, then
         neighbours), with scores, and the key chunks' rank among all memory chunks, plus what
         each key-holding ingestion segment retrieved (its causal query) while its K/V were
         computed; (b) reading: at each answer-predicting position, the attention mass per
         retrieval layer on memory, on the key's digits (both copies in the key line) and on
         the digit being predicted, and the teacher-forced log p and top-3 of every answer token;
         and the greedy answer through the evaluation's own reader.
  sweep  the greedy answer (correct?, log p of the key) of every item under each setting.
  layout (c) alone, for many items: needs only the tokenizer, runs in seconds.

    python -m experiments.passkey_depth_diagnosis probe CKPT --items 4k:50:0,8k:50:0 --out F.json
    python -m experiments.passkey_depth_diagnosis sweep CKPT --items 4k:50:0 \\
        --setting base: --setting topk16:top_k=16 --setting w896:local_window=896 --out F.json

ITEM: LENGTH:DEPTH%:SEED, or LENGTH:DEPTH%:SEED@START to move that item's key line (same key) to
token START of the prompt (a position sweep around a boundary). SETTING: NAME:KEY=VALUE,...
with MemLong keys (as `--set`) and `local_window`. Every setting starts from the evaluation's
reading (`experiments/train15_measure.sh` READ: local window 1024, memory_tokens=32768,
continuation=true, the checkpoint's causal ingestion, answers in `segment` mode). The JSON
(versions, commit) is rewritten after every item.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import memlong_jax as ml
from bench import common   # run record, atomic JSON
from memlong_jax.cli.score import parse_length
from memlong_jax.errors import UserError
from memlong_jax.eval.recall import prompts
from memlong_jax.eval.recall.evaluation import answer_correct
from memlong_jax.eval.recall.reader import Reader
from memlong_jax.io.checkpoint import load_config
from memlong_jax.io.tokenizer import load_tokenizer
from memlong_jax.memlong import diagnostics, scan
from memlong_jax.memlong.retrievers import make_retriever
from memlong_jax.presets import load_for_checkpoint
from memlong_jax.settings import ConfigError, apply_overrides

BUDGET, ROW = 8, "memlong:segment"
READ = dict(memory_tokens=32768, continuation=True)
WINDOW = 1024

memory_mass = jax.jit(diagnostics.memory_mass, static_argnames=("module", "mcfg"))
read_step = jax.jit(scan.read_step, static_argnames=("module", "mcfg"))


@dataclasses.dataclass(frozen=True)
class ItemSpec:
    length: int
    depth: float
    seed: int
    start: int | None = None

    @classmethod
    def parse(cls, text: str) -> "ItemSpec":
        body, _, start = text.partition("@")
        parts = body.split(":")
        try:
            length, depth, seed = parse_length(parts[0]), float(parts[1]) / 100, int(parts[2])
            start = int(start) if start else None
        except (IndexError, ValueError, UserError):
            raise UserError(f"bad item {text!r}: expected LENGTH:DEPTH%:SEED[@START], e.g. "
                            f"4k:50:0") from None
        if len(parts) != 3 or not 0 <= depth <= 1 or (start is not None and start < 0):
            raise UserError(f"bad item {text!r}: expected LENGTH:DEPTH%:SEED[@START], depth "
                            f"0..100")
        return cls(length, depth, seed, start)

    def build(self, tokenizer) -> prompts.Item:
        prompt = self.length - BUDGET
        item = prompts.passkey_item(tokenizer, prompt, self.depth, self.seed, self.length, 0)
        if self.start is None:
            return item
        # the key line starts after INTRO, "\n", `before` filler tokens and "\n"
        before = self.start - (item.position - int(round(self.depth * filler(tokenizer, prompt))))
        total = filler(tokenizer, prompt)
        if not 0 < before < total:
            raise UserError(f"key line start {self.start} is outside the filler")
        moved = prompts.passkey(tokenizer, prompt, before / total, int(item.answer), self.length)
        assert moved.position == self.start, (moved.position, self.start)
        return moved

    def label(self) -> str:
        at = "" if self.start is None else f"@{self.start}"
        return f"{self.length // 1024}k:{round(100 * self.depth)}:{self.seed}{at}"


def filler(tokenizer, prompt: int) -> int:
    """Filler tokens of a passkey prompt (as `prompts.passkey` counts them)."""
    fixed = len(prompts._join_lines(tokenizer, [prompts.INTRO, prompts.KEY_LINE.format(key=1),
                                                prompts.QUESTION]))
    return prompt - fixed - 2 * len(prompts.encode(tokenizer, "\n"))


def chunk_size(checkpoint: str) -> int:
    """The checkpoint's MemLong tau, read from its config (no weights loaded)."""
    return load_for_checkpoint(checkpoint, load_config(checkpoint)).chunk_size


def parse_setting(text: str) -> tuple[str, int, tuple[str, ...]]:
    """NAME:KEY=VALUE,... -> (name, local window, MemLong overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise UserError(f"bad setting {text!r}: expected NAME:KEY=VALUE,... (NAME: for none)")
    window, overrides = WINDOW, []
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        if key == "local_window":
            if not value.isdigit():
                raise UserError(f"bad local_window in {text!r}")
            window = int(value)
        else:
            overrides.append(part)
    return name, window, tuple(overrides)


class Bench:
    """One model; a reader per (MemLong settings, window), so each compiles once."""

    def __init__(self, checkpoint: str):
        self.model = ml.load(checkpoint)
        self.tok = self.model.tokenizer
        self.base = self.model.memlong_config.replace(**READ)
        self.encoder = make_retriever(self.base).encoder
        self._readers: dict = {}

    def reader(self, window: int, overrides=()) -> Reader:
        key = (window, overrides)
        if key not in self._readers:
            mcfg = apply_overrides(self.base, list(overrides)).validate(self.model.config)
            self._readers[key] = Reader(self.model, mcfg, self.encoder, window, BUDGET)
        return self._readers[key]

    def answer(self, reader: Reader, item: prompts.Item, state=None) -> dict:
        """The evaluation's answer: greedy text, correct, teacher-forced log p of the key."""
        head = item.ids[:reader.head_tokens(item.length)][None]
        state = reader.memory(head) if state is None else state
        greedy, logprob = reader.answers(ROW, item.ids[None], [item.answer_ids], state)
        text = self.tok.decode(greedy[0].tolist(), skip_special_tokens=True)
        return {"generated": text, "correct": answer_correct("passkey", text, item.answer),
                "logprob": round(float(logprob[0]), 3)}


def layout(tok, item: prompts.Item, window: int, tau: int) -> dict:
    """(c): where the key line's tokens sit: chunk, ingestion window (and its local position),
    memory or local window."""
    line = prompts.encode(tok, prompts.KEY_LINE.format(key=item.answer))
    head = item.length - window
    digits = [i for i, t in enumerate(line) if tok.decode([int(t)]).isdigit()]
    half = len(digits) // 2
    where = lambda p: {"token": p, "text": tok.decode([int(item.ids[p])]), "chunk": p // tau,
                       "chunk_offset": p % tau, "ingest_window": p // window,
                       "ingest_position": p % window + 1,
                       "in": "memory" if p < head else "local window"}
    line_at = item.position
    return {"key": item.answer, "line_start": line_at, "line_end": line_at + len(line),
            "memory_tokens": head, "memory_chunks": head // tau,
            "tokens_before_local_window": head - line_at,
            "copy1": [where(line_at + i) for i in digits[:half]],
            "copy2": [where(line_at + i) for i in digits[half:]],
            "chunk_boundaries_in_line": [p for p in range(line_at + 1, line_at + len(line))
                                         if p % tau == 0],
            "ingest_boundaries_in_line": [p for p in range(line_at + 1, line_at + len(line))
                                          if p % window == 0]}


def ranked(scores: np.ndarray) -> np.ndarray:
    """Chunk order by (score descending, chunk ascending), as the backends break ties."""
    return np.lexsort((np.arange(len(scores)), -scores))


def picks(mcfg, memory, query) -> list[dict]:
    """The chunks `scan.select_chunks` picks for `query` `[1, d]`, in pick order."""
    indices, found = scan.select_chunks(mcfg, memory, jnp.asarray(query))
    times, valid = np.asarray(memory.insert_time)[0], np.asarray(memory.valid)[0]
    first = int(times[valid].min())
    emb = np.asarray(memory.emb)[0]
    searched = mcfg.top_k - (int(mcfg.continuation) + int(mcfg.previous)) \
        * scan.neighbour_budget(mcfg)
    return [{"chunk": int(times[s]) - first, "score": round(float(emb[s] @ query[0]), 4),
             "how": "searched" if j < searched else "neighbour"}
            for j, (s, f) in enumerate(zip(np.asarray(indices)[0], np.asarray(found)[0])) if f]


def retrieval(mcfg, memory, query, key_chunks, window: int, tau: int, ingest_query) -> dict:
    """(a): the answer's picks and the key chunks' ranks; what each key-holding ingestion
    segment retrieved (memory then held only the chunks before it; `ingest_query(w, slot)`: the
    query of ingestion segment w, whose previous chunk is in `slot`)."""
    valid = np.asarray(memory.valid)[0]
    chunk = np.asarray(memory.insert_time)[0] - int(np.asarray(memory.insert_time)[0][valid].min())
    scores = np.full(int(valid.sum()), -np.inf)
    scores[chunk[valid]] = np.asarray(memory.emb)[0][valid] @ query[0]
    order = ranked(scores)
    in_memory = [c for c in key_chunks if c < len(scores)]
    out = {"answer_picks": picks(mcfg, memory, query),
           "key_chunks": {int(c): {"rank": int(np.flatnonzero(order == c)[0]),
                                   "score": round(float(scores[c]), 4)} for c in in_memory},
           "filler_score_median": round(float(np.median(np.delete(scores, in_memory))), 4),
           "memory_chunks": len(scores), "ingest_picks": {}}
    for w in sorted({c * tau // window for c in in_memory}):
        before = w * window // tau
        if before:
            held = dataclasses.replace(memory, valid=memory.valid & (jnp.asarray(chunk)[None]
                                                                     < before))
            slot = int(np.flatnonzero(valid & (chunk == before - 1))[0])
            out["ingest_picks"][w] = {"chunks_held": before,
                                      "picks": picks(mcfg, held, ingest_query(w, slot))}
    return out


def reading(bench: Bench, mcfg, state, query, item: prompts.Item, lay: dict, window: int,
            tau: int) -> dict:
    """(b): attention mass per retrieval layer at each answer-predicting position, and the
    teacher-forced log p / top-3 of each answer token (one forward over tail + answer)."""
    model, tok = bench.model, bench.tok
    tail = item.ids[-(window - BUDGET):]
    ids = np.concatenate([tail, item.answer_ids[:-1]])
    at = np.arange(len(tail) - 1, len(ids))
    seg = scan.segment_inputs(model.module, mcfg, model.params, state, jnp.asarray(ids[None]),
                              segment_query=jnp.asarray(query), need_emb=False)
    _, logits = read_step(model.module, mcfg, model.params, state, jnp.asarray(ids[None]),
                          segment_query=jnp.asarray(query), head_at=jnp.asarray(at[None]))
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1))
    times, valid = np.asarray(state.memory.insert_time)[0], np.asarray(state.memory.valid)[0]
    first = int(times[valid].min())
    picked = [int(times[s]) - first if f else None
              for s, f in zip(np.asarray(seg.indices)[0], np.asarray(seg.found)[0])]
    source = np.asarray([-1 if c is None else c * tau + j for c in picked for j in range(tau)])

    def mass(positions):
        weights = None if positions is None else \
            jnp.asarray(np.isin(source, list(positions))[None].astype(np.float32))
        m = memory_mass(model.module, mcfg, model.params, seg.h, seg.positions, seg.retrieved(),
                        weights=weights, at=jnp.asarray(at))
        return np.asarray(m)[0]          # [layers, positions, heads]

    layers = sorted(mcfg.retrieval_layers)
    per_layer = lambda m: {int(l): round(float(m[i]), 3) for i, l in enumerate(layers)}
    copy1 = [d["token"] for d in lay["copy1"]]
    copy2 = [d["token"] for d in lay["copy2"]]
    starts = [p for p in source if p >= 0 and p % window == 0]
    sets = {"memory": None, "copy1 digits": copy1, "copy2 digits": copy2,
            "ingest-window first tokens": starts}
    masses = {name: mass(p) for name, p in sets.items()}
    digit_mass = [mass([a, b]) for a, b in zip(copy1, copy2)]
    tokens = []
    for j, gold in enumerate(item.answer_ids):
        top = np.argsort(-logp[j])[:3]
        row = {"gold": tok.decode([int(gold)]), "logp": round(float(logp[j, gold]), 3),
               "top3": [[tok.decode([int(t)]), round(float(logp[j, t]), 3)] for t in top]}
        for name, m in masses.items():
            row[f"mass on {name}"] = per_layer(m[:, j].mean(-1))
        if j >= 1 and j - 1 < len(digit_mass):   # position j predicts digit j-1 (after " ")
            m = digit_mass[j - 1][:, j]
            row["mass on this digit (both copies)"] = per_layer(m.mean(-1))
            row["mass on this digit, best head"] = per_layer(m.max(-1))
        tokens.append(row)
    return {"retrieved_chunks": picked, "answer_tokens": tokens,
            "logprob_forced": round(float(sum(logp[j, g] for j, g in
                                               enumerate(item.answer_ids))), 3),
            "mass_over_answer_positions": {name: per_layer(m.mean((1, 2)))
                                           for name, m in masses.items()}}


def probe(bench: Bench, spec: ItemSpec, window: int, overrides) -> dict:
    reader = bench.reader(window, overrides)
    mcfg = reader.mode_config("segment")
    tau = mcfg.chunk_size
    item = spec.build(bench.tok)
    lay = layout(bench.tok, item, window, tau)
    head = item.ids[:reader.head_tokens(item.length)][None]
    state = reader.memory(head)
    query = reader.retriever(mcfg).window_query(item.ids[None, -(window - BUDGET):])
    key_chunks = sorted({d["chunk"] for d in lay["copy1"] + lay["copy2"]})
    emb = np.asarray(state.memory.emb)[0]

    def ingest_query(w, slot):   # the ingestion's own query mode (the reader's mcfg)
        if reader.mcfg.query_mode == "segment":
            return reader.retriever(reader.mcfg).window_query(
                head[:, w * window:(w + 1) * window])
        return emb[slot][None]

    record = {"item": spec.label(), "layout": lay,
              "retrieval": retrieval(mcfg, state.memory, query, key_chunks, window, tau,
                                     ingest_query)}
    record["reading"] = reading(bench, mcfg, state, query, item, lay, window, tau)
    record["answer"] = bench.answer(reader, item, state)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("probe", "sweep", "layout"))
    p.add_argument("checkpoint")
    p.add_argument("--items", required=True, help="comma-separated ITEMs (see above)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="sweep: one setting per flag (default: base:); probe: the one to probe "
                        "under (default: the evaluation's)")
    p.add_argument("--out", required=True, help="JSON result file")
    args = p.parse_args(argv)
    try:
        specs = [ItemSpec.parse(t) for t in args.items.split(",") if t.strip()]
        settings = [parse_setting(s) for s in args.setting or ["base:"]]
        if not specs:
            raise UserError("--items names no item")
        if args.what == "probe" and len(settings) != 1:
            raise UserError("probe takes at most one --setting")
        if args.what == "layout":
            tok = load_tokenizer(args.checkpoint)
            if tok is None:
                raise UserError(f"{args.checkpoint}: no tokenizer.json")
            layouts = [{"item": s.label(), "local_window": w,
                        **layout(tok, s.build(tok), w, chunk_size(args.checkpoint))}
                       for s in specs for _, w, _ in settings]
        else:
            bench = Bench(args.checkpoint)
            for _, window, overrides in settings:
                bench.reader(window, overrides)            # bad settings fail before any work
            items = {s: s.build(bench.tok) for s in specs}
    except (UserError, ConfigError, OSError) as err:
        print(f"passkey_depth_diagnosis: {err}", file=sys.stderr)
        return 2
    if args.what == "layout":
        data = common.record("passkey_depth_diagnosis_layout", args, {"settings": args.setting})
        data["results"] = layouts
        common.write_json(args.out, data)
        return 0
    started, git = time.perf_counter(), common.git_commit()
    config = {"checkpoint": args.checkpoint, "budget": BUDGET, "row": ROW,
              "read": dict(READ, local_window=WINDOW), "base": bench.base.to_dict(),
              "settings": [{"name": n, "local_window": w, "overrides": list(o)}
                           for n, w, o in settings]}
    results = []
    jobs = [(s, spec) for s in settings for spec in specs]
    for (name, window, overrides), spec in tqdm(jobs, desc=args.what):
        begin = time.perf_counter()
        if args.what == "probe":
            record = probe(bench, spec, window, overrides)
        else:
            item = items[spec]
            record = {"setting": name, "item": spec.label(), "key": item.answer,
                      "position": item.position,
                      **bench.answer(bench.reader(window, overrides), item)}
        record["seconds_under_load"] = round(time.perf_counter() - begin, 1)
        results.append(record)
        tqdm.write(f"{record.get('setting', '')} {spec.label()}: "
                   f"{(record.get('answer') or record)['generated']!r}")
        data = common.record(f"passkey_depth_diagnosis_{args.what}", args, config, git=git)
        data["results"] = results
        data["wall_s"] = time.perf_counter() - started
        common.write_json(args.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
