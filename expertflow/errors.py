"""User-facing errors: each carries a one-line message naming the problem and the fix."""


class ExpertflowError(Exception):
    """An error caused by the user's input or files; the CLI prints it as one line and exits non-zero."""
