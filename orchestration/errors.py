"""What a user's mistake looks like on the console: its message alone, no traceback.

A bad config value, a bad dataset row, resources the cluster cannot place, a worker that keeps failing, a disk
that fills while saving, a warm-start that failed its check, dynamic sampling that cannot fill a batch: each is
raised as an error whose message names the key, file, row, node, path or step (ConfigError, DataError,
PlacementError, RestartBudgetError, CheckpointError, WarmStartError, SamplingError). The entry points
(`python -m orchestration.train`, `tools.demo`, `tools.evaluate`, `tools.plan`) run inside `clean_exit()`, which
prints such an error as `error: <message>` on stderr and exits with status 1; it is also found as the cause of a
failed step (PhaseError). Anything else is a bug and keeps its traceback; in a sweep member that traceback is
printed at once, naming the member, not only when Hydra re-raises it after the last member. Nothing computed is
lost on the way out: the training loop's own `finally` has closed the metrics log and the actors by then.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from orchestration.checkpoint import CheckpointError
from orchestration.cluster.faults import RestartBudgetError
from orchestration.cluster.layout import PlacementError
from orchestration.config.errors import ConfigError
from orchestration.data.prompts import DataError
from orchestration.data.warm_start import WarmStartError
from orchestration.sampling import SamplingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    PlacementError,
    RestartBudgetError,
    CheckpointError,
    WarmStartError,
    SamplingError,
)
"""Errors whose message is the whole story."""


def user_message(err: BaseException, kinds: tuple[type[BaseException], ...] = USER_ERRORS) -> str | None:
    """The message to print for `err` when it, or an error in its cause chain, is one of `kinds`: the
    outermost message (a failed step's names the step and phase, then the cause); None for anything else."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, kinds):
            return str(err)
        cause = cause.__cause__
    return None


class MemberError(RuntimeError):
    """A sweep member's user error, already printed: raised instead of exiting so that the sweep goes on."""


@contextmanager
def clean_exit(*, sweep_member: bool = False, member: str = "") -> Iterator[None]:
    """Run an entry point: a user error (USER_ERRORS) ends the process with `error: <message>` and status 1,
    without a traceback; any other exception propagates unchanged. In a member of a Hydra sweep
    (`sweep_member`), the message is printed the same way but raised as a MemberError, which Hydra's sweeper
    records before it runs the next member (an exit would end the whole sweep); any other error's traceback is
    printed at once, after a line naming `member` (its output folder), and the error propagates to Hydra."""
    try:
        yield
    except Exception as err:
        message = user_message(err)
        if message is None:
            if sweep_member:  # Hydra keeps a member's exception until the whole sweep has run: show it now
                where = f" ({member})" if member else ""
                print(f"error in this sweep member{where}; the sweep goes on with the next:", file=sys.stderr)
                traceback.print_exc()
                sys.stderr.flush()
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        if sweep_member:
            raise MemberError(message) from None
        raise SystemExit(1) from None
