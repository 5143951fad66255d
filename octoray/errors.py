"""The one exception type the CLI turns into a one-line message and (by default) exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, bad config, missing file).

    The message must be one actionable line; the CLI prints it without a traceback and exits with
    ``exit_code`` (2, a usage error, unless a stage sets 1 for a run that failed).
    """

    exit_code: int = 2


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc``, also when Ray wrapped it in a RayTaskError."""
    seen: BaseException | None = exc
    while seen is not None:
        cause = getattr(seen, "cause", None)  # RayTaskError keeps the original exception here
        if isinstance(cause, UserError):
            return cause
        if isinstance(seen, UserError) and not type(seen).__name__.startswith("RayTaskError"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
