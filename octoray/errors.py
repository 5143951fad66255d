"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, bad config, missing file).

    The message must be one actionable line; the CLI prints it without a traceback.
    """
