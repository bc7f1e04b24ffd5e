"""``fedsim``: the command line. Its surface (every command and argument) is declared here;
each command runs in its own module of this package, imported only when that command runs,
so ``fedsim --help`` and ``fedsim --version`` answer at once."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from fedsim import __version__
from fedsim.cli.common import EXIT_OK, add_run_arguments, quiet_libraries


def _command(parser: argparse.ArgumentParser, handler: str) -> None:
    """``handler``: ``module:function`` of this package that runs the command."""
    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsim", description="Federated learning and test-time adaptation simulator (Flower + Ray)."
    )
    p.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a scenario (train, then adapt when it has an adaptation section)")
    add_run_arguments(
        r, out_help="run folder (default runs/<name>)", resume_help="continue a killed run from its last checkpoint"
    )
    _command(r, "run:cmd_run")

    a = sub.add_parser("adapt", help="test-time adaptation of a trained run's model on streaming shifts")
    a.add_argument("scenario", help="scenario YAML with an adaptation section (only name and adaptation are used)")
    a.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. adaptation.stream.batch_size=16")
    a.add_argument("--model", required=True, metavar="RUN_FOLDER", help="trained run folder (fedsim run output)")
    a.add_argument("--out", help="output folder (default <model run>/adapt-<scenario name>)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _command(a, "adapt:cmd_adapt")

    e = sub.add_parser("edge", help="the edge demo on Flower's deployment runtime (SuperLink + SuperNodes)")
    esub = e.add_subparsers(dest="edge_command", required=True)
    d = esub.add_parser(
        "demo", help="start SuperLink + SuperNodes, run the scenario with flwr run, live view, stop all"
    )
    add_run_arguments(
        d,
        out_help="run folder (default runs/<name>-edge)",
        resume_help="continue an interrupted demo from its last checkpoint",
    )
    d.add_argument("--no-live", dest="live", action="store_false", help="print progress lines instead of the live view")
    _command(d, "edge:cmd_demo")
    u = esub.add_parser("up", help="start SuperLink + SuperNodes for a scenario and wait (Ctrl-C stops)")
    u.add_argument("scenario")
    u.add_argument("overrides", nargs="*")
    u.add_argument("--out", help="working folder (default runs/<name>-deployment)")
    _command(u, "edge:cmd_up")
    c = esub.add_parser("certs", help="self-signed CA and server certificate for edge.tls")
    c.add_argument("dir")
    c.add_argument("--days", type=int, default=30)
    c.add_argument("--overwrite", action="store_true")
    _command(c, "edge:cmd_certs")

    s = sub.add_parser("sweep", help="run a scenario over a grid of overrides and seeds; table and plot of mean ± std")
    s.add_argument("scenario", nargs="?", help="scenario YAML file")
    s.add_argument(
        "grid",
        nargs="*",
        help="key=v1,v2,... (an axis of the grid; commas inside [...] or quotes do not split) or key=value (a fixed override)",
    )
    s.add_argument("--seeds", help="seeds of every point, e.g. 0,1,2 or 0-4 (default: the scenario's seed)")
    s.add_argument("--out", help="sweep folder (default runs/<name>-sweep)")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing fedsim sweep folder (never a folder holding other files)",
    )
    s.add_argument(
        "--resume", metavar="SWEEP_FOLDER", help="continue a sweep: finished runs are skipped, interrupted ones resumed"
    )
    _command(s, "sweep:cmd_sweep")

    _command(sub.add_parser("list", help="registered strategies, adapters, datasets, models"), "misc:cmd_list")

    rep = sub.add_parser("report", help="compare runs: runs differing only by seed as mean ± std; table, numbers, plot")
    rep.add_argument("runs", nargs="+", help="run folders (runs that differ only by seed form one group)")
    rep.add_argument(
        "--out",
        help="plot PNG path; the table and numbers go next to it as .md and .json (default: report.png next to the first run)",
    )
    rep.add_argument("--overwrite", action="store_true", help="replace a report fedsim wrote there before")
    _command(rep, "misc:cmd_report")

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    show = dsub.add_parser("show", help="save a grid of samples per domain")
    show.add_argument("scenario", nargs="?", help="scenario whose data section to use (default: built-in digits5)")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--out", default="digits5_domains.png")
    show.add_argument("--overwrite", action="store_true", help="replace a grid fedsim wrote there before")
    show.add_argument("--split", default="train", choices=["train", "test"])
    _command(show, "misc:cmd_data_show")
    parts = dsub.add_parser("partitions", help="per-client counts by label and domain, and a heat map PNG")
    parts.add_argument("scenario", help="scenario whose data section and seed to use")
    parts.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parts.add_argument("--out", help="heat map PNG (default <scenario name>-partitions.png)")
    parts.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    _command(parts, "misc:cmd_data_partitions")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 on --help / --version
        return int(exc.code or 0)
    module, _, function = args.handler.partition(":")
    # `fedsim run` on the Ray pool: Ray starts now, while the command imports (fedsim.cli.prestart)
    args.ray_start = None
    if args.handler == "run:cmd_run":
        from fedsim.cli.prestart import prestart_ray

        quiet_libraries()  # Ray reads its log settings from the environment when imported
        args.ray_start = prestart_ray(args)
    try:
        # start-up: a command's module imports torch, Flower and Ray (seconds), so it is
        # imported only when that command runs
        handler: Any = getattr(importlib.import_module(f"fedsim.cli.{module}"), function)
        return int(handler(args))
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        sys.stderr.close()
        return EXIT_OK
    finally:
        if args.ray_start is not None:  # used and shut down by the run, or never used
            args.ray_start.close()


if __name__ == "__main__":
    sys.exit(main())
