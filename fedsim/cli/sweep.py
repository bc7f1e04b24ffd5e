"""``fedsim sweep``: run a scenario over a grid of overrides and seeds (:mod:`fedsim.sweep`).

Exit codes as in :mod:`fedsim.cli.common`: 0 every run finished, 2 bad input (nothing created),
1 a run failed or the sweep was interrupted (finished runs are kept; run it again, or
``fedsim sweep --resume OUT``, to continue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedsim.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, error
from fedsim.cli.common import console as make_console
from fedsim.cli.main import main
from fedsim.schema import ScenarioError
from fedsim.sweep import SweepInterrupted, parse_seeds, parse_sweep_args, run_sweep, spec_from_saved


def cmd_sweep(args: argparse.Namespace) -> int:
    """Each point runs exactly as ``fedsim run`` does (through :func:`fedsim.cli.main.main`)."""
    console = make_console()
    try:
        if args.resume:
            if args.scenario or args.grid or args.seeds or args.out:
                raise ScenarioError("--resume takes only the sweep folder; its sweep.json says what to run")
            spec, out = spec_from_saved(Path(args.resume)), Path(args.resume)
        else:
            if not args.scenario:
                raise ScenarioError(
                    "fedsim sweep: give a scenario file (then key=v1,v2,... and key=value), or --resume SWEEP_FOLDER"
                )
            if "=" in args.scenario and not Path(args.scenario).exists():
                raise ScenarioError(
                    f"{args.scenario}: scenario file not found (the grid comes after the scenario file)"
                )
            seeds = parse_seeds(args.seeds) if args.seeds is not None else None
            spec = parse_sweep_args(args.scenario, list(args.grid), seeds)
            out = Path(args.out) if args.out else None
        folder, points = run_sweep(
            spec,
            runner=main,
            out=out,
            overwrite=args.overwrite,
            log=lambda msg: console.print(f"[b]sweep[/b] {msg}", highlight=False),
        )
    except ScenarioError as exc:  # UnsafeOutput included
        error(exc)
        return EXIT_BAD_INPUT
    except SweepInterrupted as exc:
        print(
            f"interrupted; finished runs are kept; continue with: fedsim sweep --resume {exc.folder}", file=sys.stderr
        )
        return EXIT_FAILURE
    print((folder / "sweep.md").read_text())
    failed = [r["folder"] for p in points for r in p["runs"] if r["status"] != "done"]
    print(
        f"sweep: {folder / 'sweep.md'}, {folder / 'sweep.json'}"
        + (f", {folder / 'sweep.png'}" if (folder / "sweep.png").exists() else "")
    )
    if failed:
        print(
            f"error: {len(failed)} run(s) failed ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); fix the cause and run the sweep again to retry them (finished runs are skipped)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK
