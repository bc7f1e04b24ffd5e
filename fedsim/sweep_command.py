"""``fedsim sweep``: run a scenario over a grid of overrides and seeds (:mod:`fedsim.sweep`).

Exit codes as in :mod:`fedsim.cli`: 0 every run finished, 2 bad input (nothing created),
1 a run failed or the sweep was interrupted (finished runs are kept; run it again, or
``fedsim sweep --resume OUT``, to continue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def cmd_sweep(args: argparse.Namespace) -> int:
    # Imported when the command runs: fedsim.sweep pulls in torch and the engine (slow to
    # start for `fedsim --help`), and fedsim.cli registers this command (its `main` runs
    # each point exactly as `fedsim run` does).
    from rich.console import Console

    from fedsim import cli
    from fedsim.config import ScenarioError
    from fedsim.sweep import (
        SweepInterrupted,
        parse_seeds,
        parse_sweep_args,
        run_sweep,
        spec_from_saved,
    )

    console = Console()
    try:
        if args.resume:
            if args.scenario or args.grid or args.seeds or args.out:
                raise ScenarioError("--resume takes only the sweep folder; its sweep.json says what to run")
            spec, out = spec_from_saved(Path(args.resume)), Path(args.resume)
        else:
            if not args.scenario:
                raise ScenarioError("fedsim sweep: give a scenario file (then key=v1,v2,... and key=value), or --resume SWEEP_FOLDER")
            if "=" in args.scenario and not Path(args.scenario).exists():
                raise ScenarioError(f"{args.scenario}: scenario file not found (the grid comes after the scenario file)")
            seeds = parse_seeds(args.seeds) if args.seeds is not None else None
            spec = parse_sweep_args(args.scenario, list(args.grid), seeds)
            out = Path(args.out) if args.out else None
        folder, points = run_sweep(spec, runner=cli.main, out=out, overwrite=args.overwrite, log=lambda msg: console.print(f"[b]sweep[/b] {msg}", highlight=False))
    except ScenarioError as exc:  # UnsafeOutput included
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SweepInterrupted as exc:
        print(f"interrupted; finished runs are kept; continue with: fedsim sweep --resume {exc.folder}", file=sys.stderr)
        return EXIT_FAILURE
    print((folder / "sweep.md").read_text())
    failed = [r["folder"] for p in points for r in p["runs"] if r["status"] != "done"]
    print(f"sweep: {folder / 'sweep.md'}, {folder / 'sweep.json'}" + (f", {folder / 'sweep.png'}" if (folder / "sweep.png").exists() else ""))
    if failed:
        print(f"error: {len(failed)} run(s) failed ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); fix the cause and run the sweep again to retry them (finished runs are skipped)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register ``fedsim sweep`` on the CLI's subparsers."""
    s = sub.add_parser("sweep", help="run a scenario over a grid of overrides and seeds; table and plot of mean ± std")
    s.add_argument("scenario", nargs="?", help="scenario YAML file")
    s.add_argument("grid", nargs="*", help="key=v1,v2,... (an axis of the grid; commas inside [...] or quotes do not split) or key=value (a fixed override)")
    s.add_argument("--seeds", help="seeds of every point, e.g. 0,1,2 or 0-4 (default: the scenario's seed)")
    s.add_argument("--out", help="sweep folder (default runs/<name>-sweep)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing fedsim sweep folder (never a folder holding other files)")
    s.add_argument("--resume", metavar="SWEEP_FOLDER", help="continue a sweep: finished runs are skipped, interrupted ones resumed")
    s.set_defaults(func=cmd_sweep)
