"""``octoray <verb>``: one subcommand per pipeline stage.

The verb table (:data:`octoray.stage_cli.VERBS`) is all this module knows about the stages; a stage module is imported
only when its verb runs, and stage modules import torch and ray only inside functions, so
``octoray VERB --help`` stays instant. The command line of the stage verbs is generated from
each stage's config dataclass by :mod:`octoray.stage_cli`; the client verbs (submit, status,
logs, stop) provide ``add_arguments(parser)`` and ``main(args) -> int`` in :mod:`octoray.cluster.jobs_client`.

User errors (:class:`octoray.errors.UserError`) are printed as one line on stderr with exit
code 2; a traceback means a bug in octoray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from octoray import __version__
from octoray.errors import user_error_in
from octoray.stage_cli import STAGE_VERBS, VERBS


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, VERBS))
    verbs = "\n".join(f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items())
    parser = argparse.ArgumentParser(
        prog="octoray",
        description="OctoPack on Ray: CommitPack -> CommitPackFT -> OctoCoder -> HumanEvalPack.",
        epilog=f"commands:\n{verbs}\n\nRun 'octoray <command> --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"octoray {__version__}")
    parser.add_argument("command", choices=list(VERBS), metavar="command", help="one of the commands below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``octoray`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv or ["--help"])
        return 0
    verb = top.parse_args(argv[:1]).command
    module_name, text = VERBS[verb]
    module = importlib.import_module(module_name)
    try:
        if verb in STAGE_VERBS:
            from octoray import stage_cli
            return stage_cli.main(verb, module, argv[1:], description=text)
        from octoray.stage_cli import Parser  # usage errors as one line, like every other error

        parser = Parser(prog=f"octoray {verb}", description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        args = parser.parse_intermixed_args(argv[1:])
        args.command = verb
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"octoray {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        user = user_error_in(exc)
        if user is None:
            raise
        message = str(user).strip().splitlines()[0] if str(user).strip() else type(user).__name__
        print(f"octoray {verb}: error: {message}", file=sys.stderr)
        return user.exit_code


if __name__ == "__main__":
    sys.exit(main())
