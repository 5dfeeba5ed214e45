"""`python -m memlong_jax.demo`: the command lives in `memlong_jax.cli.demo`."""

import sys

from memlong_jax.cli.demo import cli

if __name__ == "__main__":
    sys.exit(cli())
