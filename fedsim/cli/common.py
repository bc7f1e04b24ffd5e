"""What every ``fedsim`` command shares: exit codes, the one-line error, the run arguments
and a console whose tables are never cut."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from rich.console import Console

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
"""0 done, 1 failure while running (earlier rounds kept), 2 bad input (one line, nothing created)."""


class BadInput(Exception):
    """A one-line message for exit code 2."""


def error(message: object) -> None:
    """The one line a failed command prints."""
    print(f"error: {message}", file=sys.stderr)


def console() -> Console:
    """A rich console; when stdout is not a terminal (a CI log, ``| tee``, ``> log``) it is
    wide enough that no table cell is ever cut to ``0.1…``."""
    return Console() if sys.stdout.isatty() else Console(width=10_000, soft_wrap=True)


def quiet_libraries() -> None:
    """Keep Flower's and Ray's INFO logs out of the progress output."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for handler in logging.getLogger("flwr").handlers:
        handler.setLevel(logging.WARNING)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture, a notebook's)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def show_runtime_notes() -> None:
    """fedsim's INFO lines about how a run is executed (logger ``fedsim.runtime``, e.g. why
    Flower's ``run_simulation`` fallback was chosen) on stderr, one line each."""
    logger = logging.getLogger("fedsim.runtime")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)


def add_run_arguments(parser: argparse.ArgumentParser, *, out_help: str, resume_help: str) -> None:
    """The arguments every command that runs a scenario into a run folder takes
    (``fedsim run``, ``fedsim edge demo``): scenario, overrides, --out, --overwrite, --resume."""
    parser.add_argument("scenario", nargs="?", help="scenario YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--out", help=out_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing fedsim run folder (never a folder holding other files)",
    )
    parser.add_argument("--resume", metavar="RUN_FOLDER", help=resume_help)
