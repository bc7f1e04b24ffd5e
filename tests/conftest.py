"""Shared fixtures: a tiny toy scenario that trains in about a second."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from fedsim.edge.processes import processes_with_token


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background (`pytest ... &` in a script, nohup) inherits SIGINT
    # ignored, and so would every child it starts: the Ctrl-C tests (tests/engine, tests/edge)
    # need children that get SIGINT as a command typed in a terminal does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


TOY = {
    "name": "toy",
    "seed": 0,
    "rounds": 3,
    "data": {"dataset": "toy", "image_size": 16, "clients_per_domain": 2},
    "model": {"name": "cnn-small", "normalization": "bn", "args": {"width": 8}},
    "client": {"lr": 0.05, "batch_size": 16},
    "strategy": {"name": "fedavg"},
}


def write_scenario(path: Path, **updates) -> Path:
    """Write the toy scenario with top-level sections replaced/merged by ``updates``."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TOY.items()}
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def toy_yaml(tmp_path: Path) -> Path:
    return write_scenario(tmp_path / "toy.yaml")


REPO = Path(__file__).resolve().parents[1]


def checkout_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (plus ``extra``) with this checkout first on the path, for
    a child Python that must import this checkout's fedsim."""
    return {
        **os.environ,
        **(extra or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def fedsim_process(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    """``python -m fedsim.cli ARGS`` as a real child process (:func:`checkout_env` plus
    ``env``); stdout and stderr are text pipes unless ``popen`` says otherwise."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    popen.setdefault("text", True)
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", *args], env=checkout_env(env), **popen)  # type: ignore[call-overload]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    # Share one dataset cache across the session (digits5 builds once), never ~/.cache.
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path_factory.getbasetemp() / "fedsim-cache"))


# -- no process outlives a ray / edge test ---------------------------------------------
# Every process a test starts (Ray's gcs_server, raylet and ClientAppActor workers,
# `ray start` daemons, Flower SuperLink/SuperNodes, `fedsim` subprocesses) inherits this
# variable, so it is found even after it was re-parented (an orphaned Ray worker is no
# longer a child of anything the test knows). Other people's processes never carry it.
TEST_TOKEN_ENV = "FEDSIM_TEST_TOKEN"


def stop_pids(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM these pids, wait up to ``grace_s`` for them to exit, SIGKILL the rest."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        out.append(f"{pid} {cmd[:120]}")
    return "; ".join(out)


@pytest.fixture(autouse=True)
def _no_leftover_processes(request, monkeypatch):
    """Tests marked ray or edge: whatever they started must be gone when they end. Ray
    and Flower get ``grace`` seconds to finish their own shutdown; anything still
    running after that is killed (by pid) and fails the test."""
    if not {m.name for m in request.node.iter_markers()} & {"ray", "edge"}:
        yield
        return
    token = uuid.uuid4().hex
    monkeypatch.setenv(TEST_TOKEN_ENV, token)
    yield
    grace, deadline = 30.0, time.monotonic() + 30.0
    left = processes_with_token(token, env=TEST_TOKEN_ENV)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = processes_with_token(token, env=TEST_TOKEN_ENV)
    if left:
        what = describe(left)
        stop_pids(left)
        pytest.fail(f"{len(left)} process(es) still running {grace:.0f}s after the test: {what}")
