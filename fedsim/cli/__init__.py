"""fedsim's command line (``fedsim run | adapt | edge | list | report | data``): the surface in
:mod:`fedsim.cli.main`, one module per command, shared pieces in :mod:`fedsim.cli.common`."""

from fedsim.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
