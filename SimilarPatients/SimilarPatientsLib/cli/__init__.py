"""The ``similar-patients`` command line: one file per command group (references, neighbors, query, embed,
models, explore, evaluate, index build, demo), with the options, output and progress they share beside them."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import SimilarPatientsError
from ..references.store import ReferenceStore
from . import demo, embed, evaluate, explore, index_build, models, neighbors, query, references
from .options import Parser
from .progress import Bars


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="similar-patients", description="Find the IDC patients whose tumor is most like a query tumor."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for group in (references, neighbors, explore, evaluate, embed, query, models, index_build, demo):
        group.add(verbs)
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--verbose`` anywhere on the line (before or after the command): the library's log on stderr."""
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show what the library logs (downloads, caches, indexes, weights)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child, top=False)


def _show_logs() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    library = logging.getLogger("SimilarPatientsLib")
    library.addHandler(handler)
    library.setLevel(logging.INFO)


def _run(args, beam_args: list[str], store: ReferenceStore, progress: Bars) -> int:
    """Run the command ``args`` name; its exit status."""
    if args.verb == "index":
        status = index_build.run(args, beam_args)
        sys.stdout.flush()
        return status
    if args.verb == "embed":
        embed.run(args, progress)
    elif args.verb == "models":
        models.run(args, progress)
    else:
        groups = (references, neighbors, explore, evaluate, query, demo)  # each run with the store and the bars
        {group.__name__.rsplit(".", 1)[-1]: group for group in groups}[args.verb].run(args, store, progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and (args.verb, getattr(args, "action", None)) != ("index", "build"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    if args.verbose:
        _show_logs()
    store = ReferenceStore()
    progress = Bars()
    try:
        status = _run(args, beam_args, store, progress)
    except SimilarPatientsError as error:
        progress.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        _silence_stdout()
        return 0
    except OSError as error:  # a file system that refuses a write the library does not know is ours
        progress.close()
        print(f"error: {error.strerror or error} ({error.filename or 'no file name'}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
