"""``runtime: ray`` with ``engine: flower``: Flower's supported simulation path, or its fallback.

The supported path (Flower 1.42: ``flwr run`` against ``flower-superlink --simulation``):
a private SuperLink on loopback, fedsim's app (:mod:`fedsim.superlink.app`) submitted with
``flwr run`` and a federation config that carries the scenario's clients and resources
(``num-supernodes``, ``client-resources-num-cpus`` / ``-num-gpus``, the CPUs of the private
Ray), then this process follows the run until it ends and stops every process the SuperLink
started. Flower installs no dependencies for the run: the SuperLink runs with
``--disable-runtime-dependency-installation`` (and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``),
and the app declares none.

- Run folder: this process validated the scenario, made (or reopened) the folder and holds its
  lock; the ServerApp writes rounds and checkpoints into it on this process's behalf (it checks
  the lock is held by this pid). This process reads each new line of ``metrics.jsonl`` and hands
  it to ``experiment.on_round`` (progress lines, trackers), as the in-process runtimes do.
- Flower's log of the run is streamed (``flwr log --stream``, which also ends when the run does)
  and forwarded to the ``flwr`` logger at its own level, so the user sees Flower's warnings and
  errors as with the in-process engine (minus the notice about Flower's default federation size,
  which the federation config overrides).
- A failure: the ServerApp's recorded outcome (a fedsim RunFailure keeps its one line), else
  the error line of Flower's log. Ctrl-C: every process is stopped (SIGTERM, then SIGKILL after
  a grace period; found by the token they inherit, or as descendants of one that has it), then
  KeyboardInterrupt goes on.
- Ray: a private one (its own ``RAY_TMPDIR``, no ``RAY_ADDRESS``), so a ``ray start`` cluster's
  address file is not joined; removed with the run.

The fallback, chosen automatically with one INFO line saying why (logger ``fedsim.runtime``):
Flower's ``run_simulation`` in this process (:func:`fedsim.engine.runtimes.run_ray`), when the
installed Flower has no SuperLink simulation runtime, or the scenario needs what its federation
config cannot carry: a Ray address to join (``runtime.address``) or a fraction of a CPU per client
(``client-resources-num-cpus`` is an integer). README.md, "Which Flower entry point", has the
measurements and what differs (no restart of a dead client actor on the supported path).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.edge.processes import CONNECTION, DeploymentError, LocalDeployment
from fedsim.engine.flower_simulation import flower_version
from fedsim.engine.runtimes import RayRuntimeError, run_ray
from fedsim.engine.server import FederatedRun, RunFailure
from fedsim.flower_app import app_pyproject, write_app_folder
from fedsim.superlink.reaper import start_watchdog, stop_family, stop_watchdog

LOG = logging.getLogger("fedsim.runtime")
FLOWER_LOG = logging.getLogger("flwr")

# None: the app runs in the environment fedsim is installed in (the SuperLink also runs with
# --disable-runtime-dependency-installation, so Flower builds no environment per run).
APP_PYPROJECT = app_pyproject(
    "fedsim-simulation",
    "fedsim's ServerApp and ClientApp for Flower's simulation runtime (fedsim run, runtime: ray)",
    "fedsim.superlink.app",
    {"run-dir": "", "scenario-json": "", "resume": False, "owner-pid": 0, "outcome": ""},
    dependencies=[],
)

# Flower's own lines about the federation fedsim configured anyway (its default size, how to
# resize it) and the app install: not forwarded.
_NOISE = (
    "default simulated SuperNodes changed",
    "To change federation size",
    "flwr federation simulation-config",
    "Successfully installed",
    "Using SuperLink",
    "Starting logstream",
    "Starting Flower Simulation",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "INFO :      text", or with Flower's verbose format "DEBUG 2026-12-01 06:32:09,386:     text"
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)(?:\s+\d{4}-\d\d-\d\d [\d:,.]+)?\s*:\s*(.*)$")
# How long processes get to end after SIGTERM before they are killed.
STOP_GRACE_S = 10.0


def supported_path_available() -> bool:
    """Whether the installed Flower has the SuperLink simulation runtime with a federation
    config (``flwr.simulation.app``, ``SimulationConfig``; both in flwr 1.42)."""
    try:
        modules = find_spec("flwr.simulation.app") is not None and find_spec("flwr.proto.federation_config_pb2")
    except (ImportError, ValueError):
        return False
    return bool(modules) and bool(_executable("flower-superlink"))


def fallback_reason(scenario: Scenario) -> str | None:
    """Why the supported path cannot run this scenario on this Flower; None when it can."""
    rt = scenario.runtime
    if not supported_path_available():
        return f"flwr {flower_version()} has no SuperLink simulation runtime (flower-superlink --simulation with a federation config)"
    if rt.address:
        return f"runtime.address={rt.address}: Flower's federation config has no Ray address to join"
    if not float(rt.cpus_per_client).is_integer():
        return f"runtime.cpus_per_client={rt.cpus_per_client}: Flower's federation config takes whole CPUs per client (client-resources-num-cpus is an integer)"
    return None


def run_flower(experiment: FederatedRun) -> None:
    """``runtime: ray``, ``engine: flower``: the supported path, or the fallback (one INFO line why)."""
    reason = fallback_reason(experiment.scenario)
    if reason is not None:
        LOG.info("runtime ray: Flower's run_simulation (fallback), since %s", reason)
        run_ray(experiment)
        return
    run_on_superlink(experiment)


def federation_config(scenario: Scenario, num_clients: int) -> dict[str, Any]:
    """The scenario's clients and resources as Flower's federation config (``--federation-config``)."""
    rt = scenario.runtime
    cpus = int(rt.cpus_per_client)
    return {
        "num-supernodes": num_clients,
        "client-resources-num-cpus": cpus,
        "client-resources-num-gpus": float(rt.gpus_per_client),
        # a private local Ray with this machine's CPUs (as the fallback's ray_init_args)
        "init-args-num-cpus": max(int(os.cpu_count() or 1), cpus),
        "init-args-log-to-driver": True,
        # Flower's DEBUG lines (its actor pool, ...) only when this process's flwr logger wants them
        "verbose": FLOWER_LOG.isEnabledFor(logging.DEBUG),
    }


@dataclass
class _SimulationLink(LocalDeployment):
    """A LocalDeployment in simulation mode whose processes get a private Ray and no
    per-run dependency installation."""

    ray_tmpdir: str = ""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("RAY_ADDRESS", None)  # never join a cluster named in the environment
        env.update(
            {
                "RAY_TMPDIR": self.ray_tmpdir,  # no `ray start` address file is found here
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            }
        )
        return env


class FlowerRunError(RuntimeError):
    """The run on Flower's simulation runtime failed outside fedsim's own checks (one line)."""


def forward_line(line: str, level: int) -> int:
    """One line of Flower's run log to the ``flwr`` logger at the level it was logged with; a
    line without a level (a traceback's, a print) keeps ``level``, the previous line's.
    Returns the level for the next line."""
    text = _ANSI.sub("", line).rstrip()
    m = _LEVEL.match(text)
    if m:
        level, text = logging.getLevelName(m.group(1)), m.group(2)
    if text.strip() and not any(n in text for n in _NOISE):
        FLOWER_LOG.log(level, text)
    return level


class _LogStream:
    """``flwr log RUN --stream`` in the background, each line forwarded; ``done`` once it ends
    (Flower ends the stream when the run has finished)."""

    def __init__(self, link: LocalDeployment, run_id: int) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [_executable("flwr") or "flwr", "log", str(run_id), CONNECTION, "--stream"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=link.env(),
            start_new_session=True,  # Ctrl-C in the terminal is handled by this process
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        level = logging.INFO
        for line in self.proc.stdout:
            self.lines.append(line)
            level = forward_line(line, level)

    @property
    def done(self) -> bool:
        return self.proc.poll() is not None

    def close(self, wait_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(wait_s)


def _executable(name: str) -> str | None:
    """Flower's command ``name`` next to this Python (its virtual environment), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


class _MetricsTail:
    """New complete lines of ``metrics.jsonl`` since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _stop(link: LocalDeployment, grace_s: float = STOP_GRACE_S) -> None:
    """Everything the SuperLink started (SuperExec, flwr-simulation, Ray: all carry the link's
    token, or descend from one that does): :func:`fedsim.superlink.reaper.stop_family`."""
    stop_family(link.token, grace_s)
    link.stop(grace_s=2.0)


def _error_line(lines: list[str]) -> str:
    """The most telling line of Flower's run log: the last exception line, else the last error."""
    text = [_ANSI.sub("", x).strip() for x in lines if x.strip()]
    for x in reversed(text):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", x):
            return x
    for x in reversed(text):
        if x.startswith(("ERROR", "CRITICAL")):
            return x
    return text[-1] if text else "no log"


def run_on_superlink(experiment: FederatedRun) -> None:
    """The run on ``flower-superlink --simulation`` + ``flwr run`` (module docstring)."""
    run = experiment.run
    # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="fsl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    app = write_app_folder(tmp / "app", APP_PYPROJECT)
    scenario_json, outcome = tmp / "scenario.json", tmp / "outcome.json"
    scenario_json.write_text(experiment.scenario.model_dump_json())
    if experiment.resume:  # what drive() does first: the follower must not see rounds it drops
        ckpt = experiment.checkpoint
        run.truncate_metrics(ckpt.round if ckpt else 0)
    tail = _MetricsTail(run.metrics_file)
    experiment.records = run.read_metrics()
    link = _SimulationLink(
        workdir=tmp / "link",
        num_nodes=experiment.num_clients,
        state_dir=run.path,
        simulation=True,
        ray_tmpdir=str(tmp),
        token=uuid.uuid4().hex,  # its own: every process carrying it is stopped at the end
    )
    stream: _LogStream | None = None
    failed = True
    t0 = time.monotonic()
    # Ends the link's processes and removes tmp if this process dies without its finally (kill -9).
    watchdog = start_watchdog(link.token, tmp, STOP_GRACE_S)
    try:
        link.start()
        LOG.debug("SuperLink listening on %s after %.1fs", link.address, time.monotonic() - t0)
        run_id = link.submit(
            app,
            {
                "run-dir": str(run.path.resolve()),
                "scenario-json": str(scenario_json),
                "resume": experiment.resume,
                "owner-pid": os.getpid(),
                "outcome": str(outcome),
            },
            federation_config(experiment.scenario, experiment.num_clients),
        )
        LOG.debug("run %s submitted after %.1fs", run_id, time.monotonic() - t0)
        stream = _LogStream(link, run_id)
        status = _follow(experiment, link, stream, tail, outcome, run_id)
        _report(experiment, tail)
        LOG.debug("run %s %s after %.1fs", run_id, status, time.monotonic() - t0)
        _raise_for(status, outcome, stream, run_id)
        failed = False
    except DeploymentError as exc:
        raise FlowerRunError(f"Flower's simulation runtime: {exc}") from None
    finally:
        if stream is not None:
            stream.close()
        _stop(link)
        stop_watchdog(watchdog)
        LOG.debug("every process stopped after %.1fs", time.monotonic() - t0)
        if not failed or not os.environ.get("FEDSIM_DEBUG"):
            shutil.rmtree(tmp, ignore_errors=True)


def _report(experiment: FederatedRun, tail: _MetricsTail) -> None:
    for record in tail.new_records():
        experiment.records.append(record)
        if experiment.on_round:
            experiment.on_round(record)


def _follow(
    experiment: FederatedRun,
    link: LocalDeployment,
    stream: _LogStream,
    tail: _MetricsTail,
    outcome: Path,
    run_id: int,
) -> str:
    """Hand each new round to ``on_round`` until the ServerApp has recorded its outcome (then
    nothing more is written: Flower's own shutdown is not waited for) or Flower says the run
    ended without one; returns Flower's status ('' when the outcome came first)."""
    next_status = 0.0
    while True:
        _report(experiment, tail)
        if outcome.exists():
            return ""
        link.check_alive()
        # The log stream ends with the run; only then (or if it failed) ask Flower (a process each time).
        if stream.done and time.monotonic() > next_status:
            status = link.run_status(run_id)
            if status.startswith("finished"):
                _report(experiment, tail)
                return status
            next_status = time.monotonic() + 5.0
        time.sleep(0.25)


def _raise_for(status: str, outcome: Path, stream: _LogStream, run_id: int) -> None:
    """Nothing when the run completed; else fedsim's error for how it ended."""
    result = json.loads(outcome.read_text()) if outcome.exists() else None
    if result is not None and not result.get("ok"):
        if result.get("type") == "RunFailure":
            raise RunFailure(result["message"])
        raise FlowerRunError(f"the ServerApp failed: {result.get('type')}: {result.get('message')}")
    if result is not None:
        return
    stream.close()
    raise RayRuntimeError(
        f"runtime ray (Flower's simulation runtime, run {run_id}, {status or 'status unknown'}): {_error_line(stream.lines)}"
    )
