"""`python -m memlong_jax.icl`."""

import sys

from memlong_jax.errors import run_cli
from memlong_jax.icl.cli import main

sys.exit(run_cli(main))
