"""The one exception type that reaches the user as a single line: what is wrong, where, and the fix."""


class PrepError(Exception):
    """A fatal, user-fixable problem. The CLI prints `error: <message>` and exits with code 2."""


class ItemError(Exception):
    """A per-item problem (one image, one caption row): recorded and skipped by the stage."""
