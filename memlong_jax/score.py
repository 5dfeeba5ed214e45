"""`python -m memlong_jax.score`: the command lives in `memlong_jax.cli.score`."""

import sys

from memlong_jax.cli.score import cli

if __name__ == "__main__":
    sys.exit(cli())
