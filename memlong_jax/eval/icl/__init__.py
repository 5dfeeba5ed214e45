"""In-context learning with demonstrations in memory: MemLong's second evaluation, the protocol
of LongMem.

    python -m memlong_jax.icl CKPT [--tasks sst-2,sst-5,mr,subj,mpqa] [--k 4,20] [--m 18,38]
                                   [--seeds 1,2,3] [--limit N] [--rows memlong,local,full]

Data (`--data`, default ../shared/data/icl): `<task>/train.jsonl` and `<task>/test.jsonl`, one
{"text", "label"} object per line, the label a label word (for SST-2/SST-5 `test.jsonl` holds the
dev split, as upstream scores).

Protocol:

- Templates: "Review: {x} Sentiment: {y}. " (Subj: "Input: {x} Type: {y}. "). The query is the
  template cut right before the label, so it ends in "Sentiment:" / "Type:". Labels:
  negative/positive (SST-2, MR, MPQA), terrible/bad/okay/good/great (SST-5),
  subjective/objective (Subj).
- Context: k demonstrations from train, sampled once per (task, seed): the first k of a
  permutation of train drawn by `numpy.random.default_rng([seed, crc32(task), 1])`, so the k = 4
  demonstrations are the first 4 of the k = 20 ones. Prompt = the k demonstrations + the query,
  tokenised as one string (with the tokenizer's special tokens, as `Model.encode`).
- Memory: m more demonstrations for every test item, resampled per item from the train examples
  not in the context: the first m of a permutation drawn by `[seed, crc32(task), 2, item]` (so
  the m = 18 set is the start of the m = 38 one, and no draw depends on which other k, m or rows
  run). As upstream, each is tokenised on its own and the token ids are concatenated in order.
  Memory holds whole tau-token chunks, so the stream's ragged *head* is dropped: memory gets
  its last floor(P / tau) * tau tokens (the oldest demonstration loses at most tau - 1 tokens,
  and a stream shorter than tau leaves memory empty). The chunks go in through
  `memlong.ingest_prefix` (text retriever: embeddings of each chunk's decoded text, as in
  scoring); memory is sized so that nothing is evicted (upstream forces 65536 tokens) and is
  empty again for every test item.
- Test items: all of `test.jsonl`, or with `--limit N` a fixed random subset of N drawn by
  `[crc32(task), 0]` (the same for every seed, k and row), kept in file order. The files of
  MR, Subj and MPQA are sorted by label, so a plain head would be one class.
- Rows, all on the same items: `memlong m=M` (the prompt is the final window, with retrieval
  over the memory of M demonstrations); `local` (the prompt alone, empty memory: exactly
  memlong with m = 0); `full m=M` (the M memory demonstrations' tokens, none dropped, then the
  prompt, all in the local context, no memory). `full` is n/a for a (task, seed, k, m) when any
  item's input would pass `--max-context` (default: the model's max_position_embeddings).
- Prediction: the label word whose tokens (" " + word, tokenised without special tokens: the
  template has a space before the label) have the highest summed log-probability after the
  query, by teacher forcing, no length normalisation -> `accuracy`. Upstream's rule ->
  `argmax_accuracy`: the most likely next token, decoded and stripped, is non-empty and a prefix
  of the gold label word.
- Seeds (default 1, 2, 3): mean and standard deviation (numpy's, ddof 0) over seeds.

Implementation:

- The final window is `scan.read_step(..., head_at=...)`: the LM head
  runs only where label tokens are predicted, and nothing of the prompt is written to memory.
- Rows are right-padded to a length bucket (4 buckets per octave, at most 25% padding), so each
  bucket compiles once; the head reads the last real token, and with causal attention the
  padding after it changes nothing. In `segment` query mode the query is made from the real
  prompt tokens only.
- Multi-token label words: one row per (item, label) holding the prompt and the label tokens but
  the last, the item's memory tiled to it; when every label word is one token (SmolLM2), one row
  per item scores all labels from the same logits.
- Batching: a row's items are sorted by length and scored B at a time (at most `batch_tokens`
  window tokens; the last batch is filled with copies), each batch row with its own memory.
  Memory streams of different lengths are left-padded with whole chunks that are marked empty
  after ingestion: an empty memory that never evicts fills slots in order, so the padding is
  exactly slots 0..pad-1, and the result is what each row would get alone.
- The k demonstrations every window of a (task, seed, k) starts with run once (`prefix`,
  found as the windows' common token prefix): `local` runs each item's own tokens through
  every layer against their KV cache; `memlong` reuses them below the memory layer (above it
  every token sees the item's own retrieved memory). `full` windows start with the item's own
  memory demonstrations and share nothing. `ICLScorer(share_prefix=False)` runs every window
  whole (the reference in tests and `bench/icl.py`).
- Every jitted call compiles once per shape, ahead of time (`scoring.Scorer._call`), and the
  compile time is reported apart from the scoring time.
"""


from memlong_jax.eval.icl.evaluation import (  # noqa: F401
    CSV_FIELDS,
    evaluate,
    row_name,
    summarize,
    table,
    write_csv)
from memlong_jax.eval.icl.prefix import shared_prefix  # noqa: F401
from memlong_jax.eval.icl.prompts import (  # noqa: F401
    Group,
    Query,
    Settings,
    TaskData,
    build_groups,
    encode_all,
    label_token_ids,
    load_data)
from memlong_jax.eval.icl.scorer import (  # noqa: F401
    ICLScorer,
    argmax_correct,
    memory_capacity)
from memlong_jax.eval.icl.tasks import (  # noqa: F401
    DEFAULT_DATA,
    Example,
    ROWS,
    SENTIMENT,
    TASKS,
    Task,
    bucket,
    context_indices,
    get_task,
    load_split,
    memory_indices,
    memory_tokens,
    scored_items)
