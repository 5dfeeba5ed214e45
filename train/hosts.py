"""Several hosts: joining them and leaving.

Joining is `jax.distributed.initialize` with timeouts a loaded machine can meet (jax's 100 s
heartbeat was missed twice with two hosts on a CPU at load 15-50). Leaving: when a host fails
(bad input, or a collective that lost another host), it ends at once instead of waiting at jax's
shutdown barrier for hosts that may be dead or blocked in a collective with it; their collectives
then lose its connection and they fail fast too. A clean finish still meets the barrier.
"""

from __future__ import annotations

import sys
import traceback

import jax

from memlong_jax import interrupts
from memlong_jax.errors import run_cli
from train.resume import reason


def add_arguments(parser) -> None:
    parser.add_argument("--coordinator", default=None,
                        help="multi-host: coordinator address HOST:PORT, or `auto` on a TPU pod "
                             "slice or under SLURM (jax detects hosts and ranks)")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: hosts")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this host")
    parser.add_argument("--join-timeout", type=int, default=600, metavar="S",
                        help="multi-host: seconds to wait for every host to join (default 600)")
    parser.add_argument("--heartbeat-timeout", type=int, default=300, metavar="S",
                        help="multi-host: a host silent this long counts as dead and the others "
                             "stop (default 300)")
    parser.add_argument("--shutdown-timeout", type=int, default=300, metavar="S",
                        help="multi-host: seconds a finished host waits for the others at exit "
                             "(default 300)")


def join(args) -> None:
    """`jax.distributed.initialize` when the flags ask for several hosts (before anything
    touches a device)."""
    if not (args.coordinator or args.num_processes):
        return
    timeouts = dict(initialization_timeout=args.join_timeout,
                    heartbeat_timeout_seconds=args.heartbeat_timeout,
                    shutdown_timeout_seconds=args.shutdown_timeout)
    if args.coordinator == "auto":
        jax.distributed.initialize(**timeouts)
    else:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   **timeouts)


def entry_point(main):
    """`run_cli(main)` (one line and exit 2 for bad input, 128 + n for a signal), and on several
    hosts a failure leaves at once: a collective that failed is one line naming this host, any
    other error its traceback; exit 1."""
    def cli(argv=None) -> int:
        try:
            code = run_cli(main, argv)
        except Exception as err:
            if not jax.distributed.is_initialized():
                raise
            if isinstance(err, jax.errors.JaxRuntimeError):
                print(f"error: host {jax.process_index()} of {jax.process_count()} stopped: a "
                      f"collective failed ({reason(err)}); if another host died first, its log "
                      "says why; rerun every host to resume from the last checkpoint",
                      file=sys.stderr)
            else:
                traceback.print_exc()
            code = 1
        if code and jax.distributed.is_initialized():
            interrupts.exit_now(code)
        return code
    return cli
