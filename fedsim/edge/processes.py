"""Start and stop Flower's deployment runtime on this machine: one SuperLink, N SuperNodes.

Every process the demo starts (and everything those start: SuperExec, ServerApp and
ClientApp processes) carries ``FEDSIM_EDGE_TOKEN=<uuid>`` in its environment and runs in
its own session. :meth:`LocalDeployment.stop` terminates each session's process group,
then kills whatever still carries the token (Linux ``/proc``), so nothing outlives the
demo: not on success, not on failure, not on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKEN_ENV = "FEDSIM_EDGE_TOKEN"
CONNECTION = "fedsim-edge"


class DeploymentError(RuntimeError):
    """The deployment runtime could not start or the run could not be submitted (one line)."""


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def json_reply(stdout: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed (after any log lines); {} if none."""
    try:
        reply = json.loads(stdout[stdout.index("{") :])
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}


def flwr_error(reply: dict[str, Any], stdout: str, stderr: str) -> str:
    """One line saying why a ``flwr`` command failed: Flower's ``error-message`` (flwr 1.41
    JSON replies), else the last line it printed."""
    msg = reply.get("error-message") or reply.get("error")
    if not msg:
        lines = (stderr or stdout).strip().splitlines()
        msg = lines[-1] if lines else "no output"
    return " ".join(str(msg).split())


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"'{name}' not found: install Flower (pip install 'flwr[simulation]')")
    return found


def processes_with_token(token: str, env: str = TOKEN_ENV) -> list[int]:
    """Pids of live processes whose environment carries ``env=token`` (by default
    ``FEDSIM_EDGE_TOKEN``; the tests' own supervisor uses another variable)."""
    needle = f"{env}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:  # zombies are already gone
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# What a deployment working folder holds (``fedsim edge up`` refuses a folder with anything else,
# since it replaces superlink.db there); the demo's is ``<run folder>/edge``.
DEPLOYMENT_ENTRIES = frozenset(
    {"flwr-home", "logs", "run", "superlink.db", "superlink.db-wal", "superlink.db-shm", "superlink.db-journal"}
)


@dataclass
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on ``host`` (loopback), logs and Flower's
    home (apps, CLI config) under ``workdir``. Node ``i`` holds partition ``i``."""

    workdir: Path
    num_nodes: int
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    tls: TLSFiles | None = None
    # Flower's simulation runtime instead (``flower-superlink --simulation``, no SuperNode
    # processes: a run's federation config gives its number of simulated nodes).
    simulation: bool = False
    # Inherited when set, so a supervisor (e.g. a test) can find everything this demo started.
    token: str = field(default_factory=lambda: os.environ.get(TOKEN_ENV) or uuid.uuid4().hex)
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        if not self.port:
            self.port = free_port(self.host)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                TOKEN_ENV: self.token,
                "FLWR_HOME": str(self.flwr_home),
                "PYTHONUNBUFFERED": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
            }
        )
        return env

    # -- start ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True, cwd=os.getcwd()
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def _security(self, superlink: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if superlink:
            return [
                "--ssl-ca-certfile",
                str(self.tls.ca),
                "--ssl-certfile",
                str(self.tls.cert),
                "--ssl-keyfile",
                str(self.tls.key),
            ]
        return ["--root-certificates", str(self.tls.ca)]

    def start(self, timeout_s: float = 90.0) -> None:
        """SuperLink, then the SuperNodes; returns once the SuperLink accepts connections."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.workdir / "superlink.db").unlink(missing_ok=True)  # a resumed demo starts a fresh SuperLink
        self._write_cli_config()
        self._spawn(
            "superlink",
            [
                _executable("flower-superlink"),
                *self._security(True),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--database",
                str(self.workdir / "superlink.db"),
                "--disable-runtime-dependency-installation",
                *(["--simulation"] if self.simulation else []),
            ],
        )
        self._wait_listening(timeout_s)
        for i in range(0 if self.simulation else self.num_nodes):
            node_config = f'partition-id={i} num-partitions={self.num_nodes} state-dir="{self.state_dir}"'
            self._spawn(
                f"supernode-{i}",
                [
                    _executable("flower-supernode"),
                    *self._security(False),
                    "--superlink",
                    self.address,
                    "--node-config",
                    node_config,
                    "--host",
                    self.host,
                    "--port",
                    str(free_port(self.host)),
                ],
            )

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self.check_alive()
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(
            f"SuperLink did not listen on {self.address} within {timeout_s:.0f}s (log: {self.logs / 'superlink.log'})"
        )

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise DeploymentError(
                    f"{name} exited with code {proc.returncode}: {tail[0][:200]} (log: {self.logs / (name + '.log')})"
                )

    def _write_cli_config(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        lines.append(f'root-certificates = "{self.tls.ca}"' if self.tls else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    # -- runs ----------------------------------------------------------------------------
    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Flower's own CLI against this SuperLink (the connection in ``flwr-home``)."""
        return subprocess.run(
            [_executable("flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout_s
        )

    def submit(self, app_dir: Path, run_config: dict[str, Any], federation_config: dict[str, Any] | None = None) -> int:
        """``flwr run APP fedsim-edge --run-config ... [--federation-config ...]``; returns the run id."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        federation = (
            ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
            if federation_config
            else []
        )
        out = self.flwr("run", str(app_dir), CONNECTION, "--run-config", pairs, *federation, "--format", "json")
        reply = json_reply(out.stdout)
        if out.returncode != 0 or not reply.get("success", False):
            raise DeploymentError(f"flwr run failed: {flwr_error(reply, out.stdout, out.stderr)}")
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run (e.g. ``running``, ``finished:completed``); '' if unknown."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout_s=60)
        try:
            return str(json_reply(out.stdout)["runs"][0]["status"])
        except (KeyError, IndexError, TypeError):
            return ""

    # -- stop ----------------------------------------------------------------------------
    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop everything started here; returns pids that had to be killed by token."""
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace_s
        for _name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for _name, proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stragglers = processes_with_token(self.token)
        for pid in stragglers:  # e.g. a ClientApp process that left its session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while processes_with_token(self.token) and time.time() < deadline:
            time.sleep(0.1)
        return stragglers

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
