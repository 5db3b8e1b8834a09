"""Error types that decide how the CLI exits.

A :class:`UserError` is a mistake in the user's input (a path, a column, a constraint): the CLI prints its
one-line message and exits with code 2, without a traceback. Anything else is an internal error (exit 1).
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INFEASIBLE = 3


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = EXIT_USER_ERROR


class InfeasibleError(UserError):
    """No candidate meets the constraints; the message names the binding constraint."""

    exit_code = EXIT_INFEASIBLE
