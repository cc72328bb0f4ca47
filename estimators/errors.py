"""Errors meant for the user: the CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (unknown model or optimizer, malformed arguments).

    The message is a single line saying what was wrong and what would be right.
    """
