"""Why MemLong missed the pass key (issue 15): for one passkey prompt, (1) where the text
retriever ranks the chunks holding the key line under each query mode, (2) which chunks the
model's `segment` query actually retrieves from its memory, and (3) whether the model reads them:
the attention mass that each retrieval layer puts on the key's digits in memory at the positions
that predict the answer, and the teacher-forced log-probability of each answer token. Appends one
JSON line per run.

    python -m experiments.passkey_retrieval_diagnosis CKPT LENGTH DEPTH [KEY=VALUE ...] \
        --out experiments/results/passkey15/diagnosis.jsonl

KEY=VALUE: MemLong settings over the checkpoint's (the evaluation's: memory_tokens=32768
continuation=true). The local window and answer budget are the recall evaluation's (1024, 8).
rank r: r memory chunks score higher than that chunk (ties by the lower slot, as the backends).
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

import memlong_jax as ml
from memlong_jax.eval.recall import prompts
from memlong_jax.eval.recall.reader import Reader, _log_softmax_at
from memlong_jax.memlong import diagnostics, scan
from memlong_jax.memlong.retrievers import make_retriever
from memlong_jax.settings import apply_overrides

WINDOW, BUDGET, PASSAGE = 1024, 8, 512


def ranks(scores: np.ndarray, chunks) -> dict:
    order = np.lexsort((np.arange(len(scores)), -scores))
    return {int(c): int(np.flatnonzero(order == c)[0]) for c in chunks}


def text_ranks(retriever, tok, head, tail, chunks, tau) -> dict:
    """Rank and score of the key chunks under each query mode's text query."""
    texts = retriever.chunk_texts(head[None])
    emb = retriever.encoder.encode_texts(texts)
    tail_text = tok.decode(tail.tolist())
    full = tail[:len(tail) // tau * tau].reshape(-1, tau)
    queries = {
        "segment (window text, its start: before the fix)":
            retriever.encoder.encode_texts([tail_text], keep="start")[0],
        "segment (window text, its end)": retriever.encoder.encode_texts([tail_text],
                                                                         keep="end")[0],
        "causal (last memory chunk)": emb[-1],
        "chunk (the question's chunk: the tail chunk before it)":
            retriever.encoder.encode_texts(tok.decode_batch(full.tolist()))[-1],
    }
    out = {}
    for name, query in queries.items():
        scores = emb @ query
        filler = np.delete(scores, chunks)
        out[name] = {"key_chunk_ranks": ranks(scores, chunks),
                     "key_chunk_scores": [round(float(scores[c]), 4) for c in chunks],
                     "filler_max": round(float(filler.max()), 4),
                     "filler_median": round(float(np.median(filler)), 4),
                     "top4": np.lexsort((np.arange(len(scores)), -scores))[:4].tolist()}
        print(f"  {name}: {out[name]}", flush=True)
    return out


def probe(model, mcfg, state, query, ids, at, targets: dict) -> dict:
    """Retrieve for window `ids` `[S]` with the segment `query` and measure, at query positions
    `at`, the attention mass per retrieval layer on all of memory and on the memory tokens whose
    original positions are in each of `targets` (name -> positions)."""
    tau = mcfg.chunk_size
    seg = scan.segment_inputs(model.module, mcfg, model.params, state, jnp.asarray(ids[None]),
                              segment_query=query, need_emb=False)
    times, valid = np.asarray(state.memory.insert_time)[0], np.asarray(state.memory.valid)[0]
    first = int(times[valid].min())
    picked = [int(times[s]) - first if f else None
              for s, f in zip(np.asarray(seg.indices)[0], np.asarray(seg.found)[0])]
    mass = lambda w: np.asarray(diagnostics.memory_mass(
        model.module, mcfg, model.params, seg.h, seg.positions, seg.retrieved(),
        weights=None if w is None else jnp.asarray(w), at=jnp.asarray(at)))[0]  # [L, P, H]
    layers = sorted(mcfg.retrieval_layers)
    summary = lambda m: {int(l): round(float(m[i].mean()), 4) for i, l in enumerate(layers)}
    best_head = lambda m: {int(l): round(float(m[i].max(-1).mean()), 4)
                           for i, l in enumerate(layers)}
    out = {"retrieved_chunks": picked, "mass_on_memory": summary(mass(None))}
    print(f"  retrieved chunks {picked}", flush=True)
    print(f"  mass on memory (mean over heads and positions) {out['mass_on_memory']}", flush=True)
    for name, positions in targets.items():
        weights = np.zeros((1, len(picked) * tau), np.float32)
        for j, c in enumerate(picked):
            if c is not None:
                weights[0, j * tau:(j + 1) * tau] = np.isin(c * tau + np.arange(tau), positions)
        m = mass(weights)
        out[f"retrieved tokens of {name}"] = int(weights.sum())
        out[f"mass on {name}"] = summary(m)
        out[f"mass on {name}, best head"] = best_head(m)
        print(f"  {name}: {int(weights.sum())} tokens retrieved; mass {summary(m)}; best head "
              f"{best_head(m)}", flush=True)
    return out


def passkey(model, mcfg, retriever, reader, length: int, depth: float) -> dict:
    tok, tau = model.tokenizer, mcfg.chunk_size
    item = prompts.passkey_item(tok, length - BUDGET, depth, 0, length, 0)
    line = prompts.encode(tok, prompts.KEY_LINE.format(key=item.answer))
    head, tail = item.ids[:length - WINDOW], item.ids[-(WINDOW - BUDGET):]
    # the key's digits in the line ("The pass key is 12345. Remember it. 12345 is ...")
    digits = [item.position + i for i, t in enumerate(line) if tok.decode([int(t)]).isdigit()]
    chunks = sorted({item.position // tau, (item.position + len(line) - 1) // tau})
    print(f"passkey {length}: key {item.answer}, line at token {item.position}, chunks "
          f"{chunks}, digits in chunks {sorted({d // tau for d in digits})}", flush=True)
    if max(digits) >= len(head):
        raise SystemExit("the key line reaches the local window: choose a smaller depth")
    record = {"key": item.answer, "key_line_chunks": chunks, "memory_chunks": len(head) // tau,
              "text_ranks": text_ranks(retriever, tok, head, tail, chunks, tau)}
    state = reader.memory(head[None])
    # the answer-predicting positions: the prompt's last token, then the answer's tokens
    ids = np.concatenate([tail, item.answer_ids[:-1]])
    line_chunks = [p for c in chunks for p in range(c * tau, (c + 1) * tau)]
    record.update(probe(model, mcfg, state, retriever.window_query(tail[None]), ids,
                        np.arange(len(tail) - 1, len(ids)),
                        {"key line chunks": line_chunks, "key digits": digits}))
    for row in ("memlong:segment", "local"):
        gen, logits, step = reader.start(row, item.ids[None], state if row != "local" else None)
        logps, greedy = [], []
        for j, token in enumerate(item.answer_ids):
            logps.append(float(_log_softmax_at(logits, np.asarray([token]))[0]))
            greedy.append(int(np.argmax(np.asarray(logits[0], np.float32))))
            if j + 1 < len(item.answer_ids):
                gen, logits = step(gen, np.asarray([token], np.int32))
        record[row] = {"answer_token_logprobs": [round(x, 3) for x in logps],
                       "logprob": round(sum(logps), 3),
                       "argmax_given_gold_prefix": tok.decode(greedy)}
        print(f"  {row}: {record[row]}", flush=True)
    return record


def repeat(model, mcfg, retriever, reader, haystack, length: int) -> dict:
    """The same probe on `repeat` (which memory reads): mass on the first copy's tokens at the
    positions that predict the second copy, and the second copy's NLL."""
    item = prompts.repeat_item(model.tokenizer, haystack, length, PASSAGE, 0, 0)
    head, window = item.ids[:length - WINDOW], item.ids[-WINDOW:]
    print(f"repeat {length}: first copy in chunks 0..{PASSAGE // mcfg.chunk_size - 1}",
          flush=True)
    state = reader.memory(head[None])
    record = probe(model, mcfg, state, retriever.window_query(window[None]), window,
                   np.arange(WINDOW - PASSAGE, WINDOW - 1), {"first copy": range(PASSAGE)})
    for row in ("memlong:segment", "local"):
        nll = reader.nll(row, item.ids[None], PASSAGE, state if row != "local" else None)
        record[row] = {"nll_second": round(float(nll.mean()), 3)}
        print(f"  {row}: {record[row]}", flush=True)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("length", type=int)
    parser.add_argument("depth", type=float, help="0..1 (passkey)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--task", choices=("passkey", "repeat"), default="passkey",
                        help="repeat: the same probe where memory is known to be read")
    parser.add_argument("--haystack", default="../shared/data/pg19_like/jane_eyre.txt",
                        help="repeat's text")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    model = ml.load(args.checkpoint)
    # memory is written in the checkpoint's query mode (as the recall evaluation writes it) and
    # read with the segment query
    mcfg = apply_overrides(model.memlong_config.replace(memory_tokens=32768, continuation=True),
                           args.settings).validate(model.config)
    reader = Reader(model, mcfg, make_retriever(mcfg).encoder, WINDOW, BUDGET)
    mcfg = reader.mode_config("segment")
    retriever = reader.retriever(mcfg)
    record = {"task": args.task, "length": args.length, "depth": args.depth,
              "settings": args.settings}
    if args.task == "passkey":
        record.update(passkey(model, mcfg, retriever, reader, args.length, args.depth))
    else:
        with open(args.haystack) as f:
            haystack = prompts.Haystack(model.tokenizer, [f.read()])
        record.update(repeat(model, mcfg, retriever, reader, haystack, args.length))
    record["seconds_under_load"] = round(time.perf_counter() - begin, 1)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
