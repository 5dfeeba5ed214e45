"""`python -m memlong_jax.icl`: the command lives in `memlong_jax.cli.icl`."""

import sys

from memlong_jax.cli.icl import cli

if __name__ == "__main__":
    sys.exit(cli())
