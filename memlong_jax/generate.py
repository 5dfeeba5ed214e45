"""`python -m memlong_jax.generate`: the command lives in `memlong_jax.cli.generate`."""

import sys

from memlong_jax.cli.generate import cli

if __name__ == "__main__":
    sys.exit(cli())
