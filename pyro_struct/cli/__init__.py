"""The ``pyro-struct`` command line: demo, inspect, fit, posterior, check and bench (parsing and printing only).

Usage::

    pyro-struct [--threads N] COMMAND ...
    pyro-struct demo [--flow straf] [--structure faithful] [--steps N] [--seed S] [--out FOLDER]
    pyro-struct inspect FILE.py:FUNCTION [--observed a,b] [--structure faithful] [--flow straf|none] [--out FOLDER]
    pyro-struct fit FILE.py:FUNCTION --observed x --out guide.pt [--flow straf] [--steps N] [--time-budget S]
                    [--checkpoint FILE [--resume]]
    pyro-struct posterior guide.pt FILE.py:FUNCTION --obs obs.json [--samples N] [--out post.json]
    pyro-struct check guide.pt FILE.py:FUNCTION [--obs obs.json] [--out FOLDER] [--simulations N]
    pyro-struct bench NAME [options]     (from a source checkout: same as ``python -m benchmarks NAME``)

``FUNCTION`` is a Pyro model, or a factory that returns one when called (with ``--kwargs``).
Every failure ends with one line ``pyro-struct: error: ...`` on stderr: exit status 2 for usage
errors (bad arguments), 1 for failures, 130 for an interrupt. Subcommands register in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Sequence

from .base import PROG, CLIError, Command, Parser, format_summary, load_model, load_observations, one_line, usage_error
from .commands import COMMANDS

__all__ = ["main", "build_parser", "load_model", "load_observations", "format_summary", "COMMANDS", "Command", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-struct`` argument parser with one subparser per entry of :data:`COMMANDS`."""
    from .. import __version__

    parser = Parser(prog=PROG, description="Structure-aware amortised inference for Pyro models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: $PYRO_STRUCT_THREADS, else 1: small models train fastest on one)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _configure_threads(threads: int | None) -> None:
    """Training and sampling use :func:`pyro_struct.threads.torch_threads`; ``--threads`` sets its default."""
    if threads is not None:
        if threads < 1:
            raise usage_error(f"--threads must be at least 1; got {threads}")
        os.environ["PYRO_STRUCT_THREADS"] = str(threads)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    with contextlib.suppress(OSError, ValueError):
        (sys.stderr if file is None else file).write(f"{PROG}: warning: {' '.join(str(message).split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 usage error, 1 failure, 130 interrupt)."""
    old_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help and --version
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        _configure_threads(args.threads)
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (Exception, SystemExit) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_showwarning
        sys.stdout.flush()
