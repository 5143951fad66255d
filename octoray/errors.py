"""The one exception type the CLI turns into a one-line message and (by default) exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, bad config, missing file).

    The message must be one actionable line; the CLI prints it without a traceback and exits with
    ``exit_code`` (2, a usage error, unless a stage sets 1 for a run that failed).
    """

    exit_code: int = 2
