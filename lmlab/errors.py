"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem the user caused and can fix: the CLI prints its message (one plain sentence that names
    the fix) and exits non-zero, without a traceback."""
