"""`python -m memlong_jax.recall`: the command lives in `memlong_jax.cli.recall`, the benchmark
in `memlong_jax.eval.recall` (re-exported here: `memlong_jax.recall.evaluate(model, ...)`)."""

import sys

from memlong_jax.cli.recall import cli
from memlong_jax.eval.recall import *  # noqa: F401,F403

if __name__ == "__main__":
    sys.exit(cli())
