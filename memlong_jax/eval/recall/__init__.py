"""Recall beyond the local window: can the model use what lies outside it?

    python -m memlong_jax.recall CKPT [--tasks passkey,needle,repeat] [--lengths 2k,...,32k]
                                      [--depths 0,50,100] [--items N] [--rows memlong,local,full]

Three tasks (`prompts`), run in every row on the same items (`evaluation`, `reader`):
passkey (landmark attention's pass key hidden in filler), needle (a fact hidden in real text)
and repeat (a passage of real text that comes back at the end: copy gain). Average perplexity
hides what memory adds, since most tokens do not depend on text far back; these tasks are
nothing but that dependence.
"""

__all__ = ["FILLER", "INTRO", "KEY_LINE", "NEEDLES", "QUESTION", "TASKS", "VALUES", "Haystack",
           "Item", "needle_item", "passkey", "passkey_item", "repeat_item", "Reader",
           "plain_start", "ROW_KINDS", "Settings", "answer_correct", "evaluate", "summarize",
           "table", "write_csv", "write_plot"]

from memlong_jax.eval.recall.prompts import (  # noqa: F401
    FILLER, INTRO, KEY_LINE, NEEDLES, QUESTION, TASKS, VALUES, Haystack, Item, needle_item,
    passkey, passkey_item, repeat_item)
from memlong_jax.eval.recall.reader import Reader, plain_start  # noqa: F401
from memlong_jax.eval.recall.evaluation import (  # noqa: F401
    ROW_KINDS, Settings, answer_correct, evaluate, summarize, table, write_csv, write_plot)
