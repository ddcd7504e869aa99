"""The one exception type for mistakes a user can make and fix, and how to find it behind a wrapper."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user caused and can fix: the CLI prints its message (one plain sentence that names
    the fix) and exits non-zero, without a traceback."""


def user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind ``e``, if any (Hydra's ``instantiate`` wraps what a constructor raises)."""
    while e is not None and not isinstance(e, UserError):
        e = e.__cause__ or e.__context__
    return e
