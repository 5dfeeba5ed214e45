"""`python -m memlong_jax.recall`."""

import sys

from memlong_jax.errors import run_cli
from memlong_jax.recall.cli import main

sys.exit(run_cli(main))
