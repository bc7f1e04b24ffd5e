"""``fedsim edge demo | up | certs``: fedsim on Flower's deployment runtime, on this machine.

- ``demo SCENARIO``: start a SuperLink and one SuperNode per client (loopback), submit the
  app with ``flwr run``, show a live view, stop every process, print the results. The run
  folder is the one ``fedsim run`` writes, plus ``edge/`` (logs, progress, device estimates).
- ``up SCENARIO``: start the SuperLink and SuperNodes and wait (Ctrl-C stops them); prints
  the ``flwr run`` command that submits fedsim (or any Flower app) to them.
- ``certs DIR``: self-signed certificates for ``edge.tls``.

Exit codes as in :mod:`fedsim.cli.common`: 0 done, 1 failed or interrupted, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsim.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from fedsim.cli.common import console as make_console
from fedsim.data.loading import num_clients
from fedsim.edge.apps import PROGRESS
from fedsim.edge.certs import make_certificates
from fedsim.edge.config import EdgeConfig
from fedsim.edge.dashboard import ProgressReader, render
from fedsim.edge.processes import (
    DEPLOYMENT_ENTRIES,
    DeploymentError,
    LocalDeployment,
    TLSFiles,
)
from fedsim.flower_app import app_pyproject, write_app_folder
from fedsim.outputs import (
    MARKER,
    UnsafeOutput,
    check_location,
    check_out_folder,
    ownership_problem,
    write_marker,
)
from fedsim.results import RunFolder
from fedsim.scenario import load_scenario, open_run
from fedsim.schema import ScenarioError
from fedsim.tta.experiment import SUMMARY, print_table

APP_PYPROJECT = app_pyproject(
    "fedsim-edge",
    "fedsim's ServerApp (cloud) and ClientApp (edge) for Flower's deployment runtime",
    "fedsim.edge.apps",
    {"scenario": "", "run-dir": "", "resume": False},
    dependencies=["flwr"],
)


def write_app(folder: Path) -> Path:
    """A minimal Flower app folder whose components are fedsim's installed apps."""
    return write_app_folder(folder, APP_PYPROJECT)


class _Interrupted(Exception):
    pass


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise _Interrupted()


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Scenario (TLS paths made absolute) and its edge section."""

    scenario = load_scenario(args.scenario, list(args.overrides))
    edge = scenario.edge or EdgeConfig()
    if edge.tls is not None:
        base = Path(args.scenario).resolve().parent
        edge.tls.ca, edge.tls.cert, edge.tls.key = (
            str((base / p).resolve()) for p in (edge.tls.ca, edge.tls.cert, edge.tls.key)
        )
        scenario = scenario.model_copy(update={"edge": edge})
    return scenario, edge


def _deployment(workdir: Path, state_dir: Path, scenario: Any, edge: Any) -> Any:
    """Processes' files under ``workdir``; SuperNodes keep client state in ``state_dir``
    (the run folder, so it matches a simulation's)."""

    tls = TLSFiles(Path(edge.tls.ca), Path(edge.tls.cert), Path(edge.tls.key)) if edge.tls else None
    return LocalDeployment(
        workdir=workdir,
        num_nodes=num_clients(scenario.data),
        state_dir=state_dir,
        host=edge.host,
        port=edge.port,
        tls=tls,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    console = make_console()
    try:
        if args.resume:
            run, scenario = open_run(args.resume, lock=True)  # one writer per run folder
            edge = scenario.edge or EdgeConfig()
        else:
            if not args.scenario:
                raise ScenarioError("fedsim edge demo: give a scenario file or --resume RUN_FOLDER")
            if args.out:
                check_out_folder(args.out)
            scenario, edge = _load(args)
            out = Path(args.out) if args.out else Path("runs") / f"{scenario.name}-edge"
            check_out_folder(out)
            run = RunFolder.create(out, scenario, overwrite=args.overwrite)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir = run.path.resolve()
    for stale in ("progress.jsonl",):
        (run_dir / "edge" / stale).unlink(missing_ok=True)
    app = write_app(run_dir / "edge" / "app")
    deployment = _deployment(run_dir / "edge", run_dir, scenario, edge)
    security = "TLS (" + Path(edge.tls.ca).name + ")" if edge.tls else "insecure loopback (no TLS)"
    console.print(
        f"[b]{scenario.name}[/b]: SuperLink on {deployment.address} ({security}), {num_clients(scenario.data)} SuperNodes -> {run_dir}"
    )
    reader = ProgressReader(run_dir / "edge" / PROGRESS)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.perf_counter()
    code, message = EXIT_OK, ""
    try:
        deployment.start(edge.startup_timeout_s)
        run_id = deployment.submit(
            app, {"scenario": str(run_dir / "scenario.yaml"), "run-dir": str(run_dir), "resume": True}
        )  # the folder made or resumed above
        console.print(f"submitted with flwr run: run id {run_id} (logs: {deployment.logs})")
        code, message = _follow(console, reader, deployment, run_id, edge, scenario.name, args.live, edge.run_timeout_s)
    except DeploymentError as exc:
        code, message = EXIT_FAILURE, f"error: {exc}"
    except (KeyboardInterrupt, _Interrupted):
        advice = (
            f"continue with: fedsim edge demo --resume {run_dir}"
            if run.resumable()
            else f"nothing was checkpointed yet; start again with --overwrite, or fedsim edge demo --resume {run_dir} starts it from round 1"
        )
        code, message = EXIT_FAILURE, f"interrupted; every process stopped ({advice})"
    finally:
        stragglers = deployment.stop()
        signal.signal(signal.SIGTERM, old)
    if stragglers:
        console.print(f"stopped {len(stragglers)} leftover process(es) by token")
    if code != EXIT_OK:
        print(message, file=sys.stderr)
        return code
    _print_results(console, run_dir)
    console.print(f"done in {time.perf_counter() - t0:.1f}s; results in {run_dir} (fedsim report {run_dir})")
    return EXIT_OK


def _follow(
    console: Any, reader: Any, deployment: Any, run_id: int, edge: Any, title: str, live: bool, timeout_s: float
) -> tuple[int, str]:
    """Show progress until the cloud reports done/failed, a process dies, Flower says the
    run ended without a report, or ``timeout_s`` passes."""
    from rich.live import Live

    deadline = time.time() + timeout_s
    next_status = time.time() + 5
    view = (
        Live(render(reader.state, edge, title), console=console, refresh_per_second=4, transient=False)
        if live
        else None
    )
    try:
        if view:
            view.start()
        while not reader.finished:
            events = reader.poll()
            if view:
                view.update(render(reader.state, edge, title))
            else:
                for ev in events:
                    _print_event(console, ev)
            if reader.finished:
                break
            deployment.check_alive()
            if time.time() > deadline:
                raise DeploymentError(f"run {run_id} did not finish within edge.run_timeout_s={timeout_s:.0f}s")
            if time.time() > next_status:
                next_status = time.time() + 5
                status = deployment.run_status(run_id)
                if status.startswith("finished"):
                    reader.poll()
                    if not reader.finished:
                        logs = (
                            deployment.flwr("log", str(run_id), "fedsim-edge", "--show", timeout_s=30)
                            .stdout.strip()
                            .splitlines()[-3:]
                        )
                        raise DeploymentError(
                            f"Flower reports run {run_id} {status} without a result: {' | '.join(logs)[:300]}"
                        )
            time.sleep(0.25)
    finally:
        if view:
            view.update(render(reader.state, edge, title))
            view.stop()
    if reader.state["phase"] == "failed":
        return EXIT_FAILURE, f"error: the cloud (ServerApp) failed: {reader.state.get('error')}"
    return EXIT_OK, ""


def _print_event(console: Any, ev: dict[str, Any]) -> None:
    kind = ev["event"]
    if kind == "round":
        r = ev["record"]
        acc = r.get("accuracy")
        console.print(f"round {r['round']}: accuracy {acc:.4f}" if acc is not None else f"round {r['round']}")
    elif kind == "edge" and ev.get("done"):
        acc = ev["correct"] / ev["samples"] if ev["samples"] else 0.0
        console.print(
            f"edge {ev['edge']} {ev['adapter']} seed {ev['seed']}: online accuracy {acc:.4f} over {ev['samples']} samples"
        )
    elif kind == "failed":
        console.print(f"[red]failed: {ev.get('error')}[/red]")


def _print_results(console: Any, run_dir: Path) -> None:
    run, scenario = open_run(run_dir)
    records = run.read_metrics()
    if records:
        last = records[-1]
        console.print(
            f"training: round {last['round']}, accuracy {last['accuracy']:.4f}, MB up {last['bytes_up_total'] / 1e6:.2f}, MB down {last['bytes_down_total'] / 1e6:.2f}"
        )
    if (run_dir / SUMMARY).is_file():
        print_table(
            console,
            json.loads((run_dir / SUMMARY).read_text()),
            title=f"{scenario.name} on Flower's deployment runtime: online error",
        )
    devices = run_dir / "edge" / "devices.json"
    report = json.loads(devices.read_text()) if devices.is_file() else {"rows": []}
    if report["rows"]:
        table = Table(title="device-profile estimates (whole stream; see docs/edge.md)")
        for col in (
            "edge",
            "device",
            "adapter",
            "online acc",
            "ms/batch",
            "energy J",
            "MB up",
            "MB down",
            "memory MB",
            "fits",
        ):
            table.add_column(col, justify="left" if col in ("device", "adapter") else "right")
        for r in report["rows"]:
            table.add_row(
                str(r["edge"]),
                r["profile"],
                r["adapter"],
                f"{r['accuracy']:.4f}",
                f"{r['latency_ms_per_batch']:.1f}",
                f"{r['energy_j']:.2f}",
                f"{r['bytes_up'] / 1e6:.3f}",
                f"{r['bytes_down'] / 1e6:.3f}",
                f"{r['memory_mb']:.1f}",
                "yes" if r["fits_memory"] else "[red]no[/red]",
            )
        console.print(table)


def cmd_up(args: argparse.Namespace) -> int:
    console = make_console()
    try:
        scenario, edge = _load(args)
        check_out_folder(args.out or Path("runs") / f"{scenario.name}-deployment")
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    workdir = Path(args.out or Path("runs") / f"{scenario.name}-deployment").resolve()
    try:  # the SuperLink's database there is replaced at start: never in the user's own folders
        check_location(workdir, "deployment")
        if workdir.is_dir() and (foreign := sorted({p.name for p in workdir.iterdir()} - DEPLOYMENT_ENTRIES)):
            raise UnsafeOutput(
                f"{workdir}: holds files fedsim did not write ({', '.join(foreign[:3])}); choose another --out"
            )
    except UnsafeOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir = workdir / "run"
    deployment = _deployment(workdir, run_dir, scenario, edge)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        deployment.start(edge.startup_timeout_s)
        console.print(
            f"SuperLink on {deployment.address} with {num_clients(scenario.data)} SuperNodes; Ctrl-C stops them all."
        )
        console.print("Submit fedsim's app from the repository root with Flower's CLI:")
        console.print(
            f"  FLWR_HOME={deployment.flwr_home} flwr run . fedsim-edge --stream "
            f'--run-config \'scenario="{Path(args.scenario).resolve()}" run-dir="{run_dir}"\'',
            highlight=False,
            soft_wrap=True,
        )
        while True:
            deployment.check_alive()
            time.sleep(1)
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, _Interrupted):
        console.print("stopping")
        return EXIT_OK
    finally:
        deployment.stop()
        signal.signal(signal.SIGTERM, old)


def cmd_certs(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    try:  # only certificates fedsim wrote are replaced, only in a folder holding nothing else
        check_location(out, "certificates")
        if out.is_dir() and any(out.iterdir()):
            if not args.overwrite:
                raise UnsafeOutput(
                    f"{out}: folder is not empty; pass --overwrite to replace the certificates fedsim wrote there"
                )
            if problem := ownership_problem(out, "certs"):
                raise UnsafeOutput(f"{out}: certificates not replaced: {problem}")
    except UnsafeOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    paths = make_certificates(out, days=args.days)
    if not (out / MARKER).exists():
        write_marker(out, "certs")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(tls_advice({k: Path(v).resolve() for k, v in paths.items()}))
    return EXIT_OK


def tls_advice(paths: dict[str, Path]) -> str:
    """How to use the certificates: absolute paths, so the lines work for a scenario file in
    any folder (relative ``edge.tls`` paths are read relative to the scenario file)."""
    mapping = f"{{ca: {paths['ca']}, cert: {paths['cert']}, key: {paths['key']}}}"
    return f"use them in a scenario:\n  edge:\n    tls: {mapping}\nor on the command line:\n  fedsim edge demo scenarios/edge-demo.yaml 'edge.tls={mapping}'"
