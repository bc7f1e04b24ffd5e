"""The ray runtime (its pool engine, and Flower's simulation engine on Ray): agrees with the inline runtime,
starts a private Ray or joins a given cluster, and always ends in bounded time (Ctrl-C,
a crashing runtime), leaving no Ray process behind (see also conftest's
``_no_leftover_processes``)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TEST_TOKEN_ENV, TOY, describe, fedsim_process, stop_pids, write_scenario

import fedsim.api as fedsim_api
from fedsim.cli import main
from fedsim.cli.edge import write_app
from fedsim.data.loading import num_clients
from fedsim.edge.processes import CONNECTION, LocalDeployment, processes_with_token
from fedsim.scenario import load_scenario

pytestmark = pytest.mark.ray
# One Ray actor (all CPUs for one client) is enough to compare with the inline runtime, and
# keeps processes and threads few on a loaded machine.
ONE_ACTOR = f"runtime.cpus_per_client={os.cpu_count() or 1}"


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


STRATEGIES = {
    "fedbn": ["strategy.name=fedbn", "strategy.args={fraction_train: 0.5}"],
    "ef21-randk": ["strategy.name=ef21", "strategy.args={fraction_train: 0.5, compressor: 'randk:0.1', init: zero}"],
    # FedWon: no normalization layers, AGC in the clients' steps
    "fedwon": [
        "strategy.name=fedwon",
        "model.normalization=none",
        "strategy.args={agc_lambda: 1.0, fraction_train: 0.5}",
    ],
    # FedTiny: candidate selection through forward-only evaluate tasks, masks, pruning/growing
    "fedtiny": [
        "strategy.name=fedtiny",
        "strategy.args={density: 0.3, num_candidates: 2, delta_t: 1, t_end: 3, fraction_train: 0.5}",
    ],
}
# The pool engine with two worker actors and the driver running no client itself, so that
# every client call runs in a Ray worker process (the pool's log line proves it).
POOL_WORKERS = [
    "runtime.name=ray",
    "runtime.engine=pool",
    "runtime.workers=2",
    "runtime.cpus_per_client=1",
    "runtime.driver_runs_clients=false",
]
POOL_LINE = re.compile(
    r"runtime ray \(pool\): (\d+) workers.*; (\d+) client calls, (\d+) in the driver, (\d+) in (\d+) worker processes"
)


def pool_calls(caplog) -> tuple[int, int, int, int]:
    """(workers, calls, calls in the driver, worker processes that ran calls) from the pool's log line."""
    lines = [m for r in caplog.records if (m := POOL_LINE.search(r.getMessage()))]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    workers, total, driver, _, processes = map(int, lines[0].groups())
    return workers, total, driver, processes


def assert_agree(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra["bytes_up"] == rb["bytes_up"] and ra["bytes_down"] == rb["bytes_down"]
        assert ra["per_client"].keys() == rb["per_client"].keys()
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        for d in ra["per_domain"]:
            assert ra["per_domain"][d] == pytest.approx(rb["per_domain"][d], abs=1e-6)
        # the strategy's own decisions too (FedTiny's candidate losses and mask changes,
        # densities, EF21 counters); wall times differ by nature
        sa, sb = ra["strategy_metrics"], rb["strategy_metrics"]
        assert sa.keys() == sb.keys()
        for k in sa:
            if not k.endswith("_s"):
                assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k
        assert [(f["client"], f["reason"]) for f in ra["failures"]] == [
            (f["client"], f["reason"]) for f in rb["failures"]
        ]


@pytest.mark.parametrize(
    ("strategy", "engine"),
    # engine: flower's agreement: test_flower_engine_runs_on_flowers_supported_path_and_agrees
    [pytest.param(name, "pool", id=f"{name}-pool") for name in STRATEGIES],
)
def test_ray_and_inline_agree(toy_yaml, tmp_path, strategy, engine, capfd, caplog):
    caplog.set_level(logging.INFO, logger="fedsim.runtime")
    common = [*STRATEGIES[strategy], "runtime.num_threads=1"]
    assert main(["run", str(toy_yaml), *common, "--out", str(tmp_path / "inline")]) == 0
    assert main(["run", str(toy_yaml), *common, *POOL_WORKERS, "--out", str(tmp_path / "ray")]) == 0
    # Flower's run_simulation deprecation notice never reaches the user (fedsim.engine.flower_simulation)
    out, err = capfd.readouterr()
    assert "DEPRECATED FEATURE" not in out + err, (out + err)[-3000:]
    workers, calls, driver, processes = pool_calls(caplog)
    assert workers == 2 and calls > 0 and driver == 0 and processes >= 1
    assert_agree(metrics(tmp_path / "inline"), metrics(tmp_path / "ray"))


def test_pool_faults_and_timeouts_as_inline(toy_yaml, tmp_path, caplog, capsys):
    """Injected failures, NaN replies and stragglers past the timeout on the pool's workers
    (and the driver) drop the same clients as on the inline runtime."""
    caplog.set_level(logging.INFO, logger="fedsim.runtime")
    faults = [
        "faults.failure_prob=0.2",
        "faults.nan_prob=0.2",
        "faults.straggler_prob=0.3",
        "faults.straggler_delay_s=1.5",
        "faults.client_timeout_s=1.0",
        "faults.min_success_fraction=0.25",
        "runtime.num_threads=1",
    ]
    assert main(["run", str(toy_yaml), *faults, "--out", str(tmp_path / "inline")]) == 0
    pool = ["runtime.name=ray", "runtime.engine=pool", "runtime.workers=1", "runtime.cpus_per_client=1"]
    capsys.readouterr()
    assert main(["run", str(toy_yaml), *faults, *pool, "--out", str(tmp_path / "pool")]) == 0
    # the user sees the pool's account on stderr, one line
    assert len([x for x in capsys.readouterr().err.splitlines() if x.startswith("INFO: runtime ray (pool): ")]) == 1
    a, b = metrics(tmp_path / "inline"), metrics(tmp_path / "pool")
    reasons = {f["reason"].split(":")[0] for r in a for f in r["failures"]}
    assert {"error", "no reply (timeout)", "non-finite values (NaN/Inf) in update"} <= reasons
    assert_agree(a, b)
    assert pool_calls(caplog)[0] == 1
    # `fedsim run` started Ray before its imports, and the run used that Ray; the line
    # accounts for the worker's start (Ray's start began before the run's pool did)
    line = next(r.getMessage() for r in caplog.records if "(Ray started before the run)" in r.getMessage())
    start = re.search(
        r"its start: Ray began (\d+\.\d) s before the run and was up (\d+\.\d) s after it began, "
        r"then the worker imported for (\d+\.\d) s and built its client runtime in (\d+\.\d) s",
        line,
    )
    assert start is not None, line
    lead, up, imported, built = map(float, start.groups())
    assert lead >= 0 and up > 0 and imported > 0 and built >= 0


def test_pool_through_the_python_api_starts_its_own_ray_and_agrees(toy_yaml, tmp_path, caplog):
    """``fedsim.api.run`` has no prestart: the pool starts Ray itself when the run starts,
    and the results are the CLI's (prestarted Ray) to the last digit checked."""
    caplog.set_level(logging.INFO, logger="fedsim.runtime")
    common = [*STRATEGIES["fedbn"], "runtime.num_threads=1", "runtime.name=ray", "runtime.workers=1"]
    assert main(["run", str(toy_yaml), *common, "--out", str(tmp_path / "cli")]) == 0
    result = fedsim_api.run(str(toy_yaml), common, out=tmp_path / "api")
    lines = [r.getMessage() for r in caplog.records if POOL_LINE.search(r.getMessage())]
    assert len(lines) == 2 and "(Ray started before the run)" in lines[0]
    assert "(Ray started before the run)" not in lines[1] and " 1 workers" in lines[1]
    assert_agree(metrics(tmp_path / "cli"), result.records)


def test_the_pools_private_ray_has_a_lean_head_unless_told():
    """By default the pool's private Ray runs without the autoscaler's monitor and the
    dashboard's API server (``runtime.lean_head``; the agreement tests above run on it);
    ``lean_head: false`` starts Ray's full head."""
    import ray
    from ray._private import ray_constants

    from fedsim.config import RuntimeConfig, Scenario
    from fedsim.engine.ray_start import RayStart

    daemons = {ray_constants.PROCESS_TYPE_MONITOR, ray_constants.PROCESS_TYPE_DASHBOARD}
    for lean in (True, False):
        start = RayStart(RuntimeConfig(name="ray", workers=1, lean_head=lean))
        try:
            assert start.wait_started(120.0)
            start.check()
            assert start.workers == 1 and len(start.actors) == 1
            running = set(ray._private.worker._global_node.all_processes)
            assert ray_constants.PROCESS_TYPE_RAYLET in running
            assert (running & daemons) == (set() if lean else daemons), running
            # its worker serves: it builds its client runtime
            toy = Scenario.model_validate(TOY).model_dump_json()
            assert isinstance(ray.get(start.actors[0].setup.remote(toy, None))[0], int)
        finally:
            start.close()
        assert not ray.is_initialized()


def test_bad_input_found_after_ray_was_prestarted_leaves_no_ray(toy_yaml, tmp_path, capsys):
    """A scenario whose schema is valid (so `fedsim run` starts Ray before its imports) but
    that the full validation rejects: the usual one-line error and exit 2, no run folder, and
    the Ray started meanwhile is shut down before the command returns (conftest checks that
    no Ray process is left)."""
    pool = ["runtime.name=ray", "runtime.workers=1", "strategy.name=nosuch"]
    assert main(["run", str(toy_yaml), *pool, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy.name" in err[0], err
    assert not (tmp_path / "run").exists()


DYING = '''
import os
from pathlib import Path

from fedsim.strategies.fedbn import FedBN, FedBNClient


class DyingOnceClient(FedBNClient):
    """FedBN's client, whose process dies the first time a worker (not the test's
    own process) loads client 1's round-2 message."""

    def load(self, model, received, state):
        marker = Path(os.environ["FEDSIM_TEST_DIE_ONCE"])
        if (
            os.getpid() != int(os.environ["FEDSIM_TEST_DRIVER_PID"])
            and state.server_round == 2
            and state.folder.name == "1"
            and not marker.exists()
        ):
            marker.write_text(str(os.getpid()))
            os._exit(1)
        super().load(model, received, state)


class DyingOnce(FedBN):
    client_hooks = "fedsim_test_dying:DyingOnceClient"
'''


def test_pool_worker_death_is_restarted_with_the_same_result(toy_yaml, tmp_path, monkeypatch, caplog):
    """A worker process that dies in the middle of a client call is restarted by Ray and
    the call retried: the run ends as the inline run does, and the calls ran in two
    worker processes (the one that died and its replacement)."""
    caplog.set_level(logging.INFO, logger="fedsim.runtime")
    code = tmp_path / "code"
    code.mkdir()
    (code / "fedsim_test_dying.py").write_text(DYING)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FEDSIM_TEST_DIE_ONCE", str(tmp_path / "died"))
    monkeypatch.setenv("FEDSIM_TEST_DRIVER_PID", str(os.getpid()))
    common = ["strategy.name=fedsim_test_dying:DyingOnce", "runtime.num_threads=1"]
    assert main(["run", str(toy_yaml), *common, "--out", str(tmp_path / "inline")]) == 0
    pool = POOL_WORKERS[:2] + ["runtime.workers=1", "runtime.driver_runs_clients=false"]
    assert main(["run", str(toy_yaml), *common, *pool, "--out", str(tmp_path / "pool")]) == 0
    assert (tmp_path / "died").is_file(), "the worker never died"
    workers, calls, driver, processes = pool_calls(caplog)
    assert workers == 1 and driver == 0 and processes == 2
    a, b = metrics(tmp_path / "inline"), metrics(tmp_path / "pool")
    assert all(not r["failures"] for r in b)  # the retried call succeeded
    assert_agree(a, b)


# -- fedsim run as a real process ----------------------------------------------------------
def fedsim(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m fedsim.cli ARGS`` in its own session (so it has its own process group,
    as a shell job has), this checkout first on the path."""
    return fedsim_process(*args, env={**(env or {}), "COLUMNS": "200"}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"fedsim did not end within {timeout:.0f}s: {err[-3000:]}")


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (a private Ray's gcs_server, raylet and
    workers stay in the driver's group)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def gone(pgid: int, wait_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_ctrl_c_ends_the_run_keeps_rounds_and_resumes(tmp_path):
    """SIGINT to the run's process group (what Ctrl-C in a terminal does) during a Ray run:
    it ends within a minute, says how to resume, keeps the finished rounds, leaves no Ray
    process, and the advised ``--resume`` finishes the run."""
    # the default engine, with one worker actor (the automatic count may be 0 on a loaded machine)
    path = write_scenario(tmp_path / "s.yaml", rounds=30, runtime={"name": "ray", "workers": 1})
    out = tmp_path / "run"
    proc = fedsim("run", str(path), "--out", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = finish(proc, timeout=90)
    assert proc.returncode == 1, err[-3000:]
    assert f"interrupted; continue with: fedsim run --resume {out}" in err
    assert gone(proc.pid) == []
    rounds = [json.loads(x)["round"] for x in metrics.read_text().splitlines()]
    assert rounds == list(range(1, len(rounds) + 1)) and 2 <= len(rounds) < 30

    again = fedsim("run", "--resume", str(out))
    _, err = finish(again, timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert [json.loads(x)["round"] for x in metrics.read_text().splitlines()] == list(range(1, 31))
    assert gone(again.pid) == []


# -- an existing cluster (`ray start --head`) ----------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A one-CPU Ray head on loopback, as ``ray start --head`` leaves it: daemons, and the
    address file that a plain ``ray.init()`` joins. Everything under a private temp dir
    (RAY_TMPDIR for the runs, so only they see its address file), explicit free ports,
    stopped by pid (never ``ray stop``, which stops every cluster on the machine)."""
    # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    gcs, node_manager, object_manager, client_server, agent, agent_grpc, env_agent, metrics, *workers = free_ports(16)
    env = {**os.environ, "RAY_TMPDIR": str(root)}
    argv = [
        shutil.which("ray") or str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(root / "ray"),
        "--num-cpus",
        "1",
        "--port",
        str(gcs),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--ray-client-server-port",
        str(client_server),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(env_agent),
        "--metrics-export-port",
        str(metrics),
        "--worker-port-list",
        ",".join(map(str, workers)),
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        assert (root / "ray" / "ray_current_cluster").is_file()
        yield {
            "address": f"127.0.0.1:{gcs}",
            "env": {"RAY_TMPDIR": str(root)},
            "session": (root / "ray" / "session_latest").resolve(),
        }
    finally:
        stop_pids(processes_with_token(os.environ[TEST_TOKEN_ENV], env=TEST_TOKEN_ENV))
        shutil.rmtree(root, ignore_errors=True)


def test_existing_cluster_private_join_and_crash(ray_head, tmp_path):
    """With a `ray start` cluster's address file present: no runtime.address -> a private
    local Ray (not the cluster, whose CPU count would clash); runtime.address -> that
    cluster is joined; a runtime that cannot start (clients too big for the one-CPU
    cluster) ends at once with one line saying why, not after minutes of waiting."""
    path = write_scenario(tmp_path / "s.yaml", rounds=2, runtime={"name": "ray"})
    cluster = {p for p in processes_with_token(os.environ[TEST_TOKEN_ENV], env=TEST_TOKEN_ENV)}

    private = fedsim("run", str(path), "--out", str(tmp_path / "private"), env=ray_head["env"])
    out, err = finish(private, timeout=300)
    assert private.returncode == 0, err[-3000:]
    assert "DEPRECATED FEATURE" not in out + err  # a normal run, as a user sees it
    assert gone(private.pid) == [], describe(group_members(private.pid))

    drivers = set((ray_head["session"] / "logs").glob("python-core-driver-*"))
    joined = fedsim(
        "run",
        str(path),
        f"runtime.address={ray_head['address']}",
        "--out",
        str(tmp_path / "joined"),
        env=ray_head["env"],
    )
    _, err = finish(joined, timeout=300)
    assert joined.returncode == 0, err[-3000:]
    assert set((ray_head["session"] / "logs").glob("python-core-driver-*")) - drivers, "no driver joined the cluster"
    assert [json.loads(x)["accuracy"] for x in (tmp_path / "joined" / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(x)["accuracy"] for x in (tmp_path / "private" / "metrics.jsonl").read_text().splitlines()
    ]

    crash = fedsim(
        "run",
        str(path),
        f"runtime.address={ray_head['address']}",
        "runtime.cpus_per_client=2",
        "--out",
        str(tmp_path / "crash"),
        env=ray_head["env"],
    )
    _, err = finish(crash, timeout=120)
    assert crash.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"runtime ray (Ray at {ray_head['address']})" in errors[0], err[-3000:]
    assert cluster <= set(processes_with_token(os.environ[TEST_TOKEN_ENV], env=TEST_TOKEN_ENV)), (
        "the cluster must survive its clients"
    )


# -- Flower's supported simulation path: flower-superlink --simulation + flwr run ----------
def test_fedsim_app_on_flowers_simulation_runtime_matches_inline(toy_yaml, tmp_path):
    """fedsim's Flower app (pyproject's [tool.flwr.app] components) submitted with
    ``flwr run`` to ``flower-superlink --simulation`` (README, "Which Flower entry point";
    docs/edge.md): Flower's simulated SuperNodes give the inline runtime's metrics, the run
    installs no dependencies, and no process outlives the SuperLink."""
    assert main(["run", str(toy_yaml), "runtime.num_threads=1", "--out", str(tmp_path / "inline")]) == 0
    clients = num_clients(load_scenario(str(toy_yaml)).data)
    run_dir = (tmp_path / "flower").resolve()
    with LocalDeployment(workdir=tmp_path / "link", num_nodes=clients, state_dir=run_dir, simulation=True) as link:
        link.start()
        run_id = link.submit(
            write_app(tmp_path / "app"),
            {"scenario": str(toy_yaml.resolve()), "run-dir": str(run_dir)},
            {"num-supernodes": clients, "client-resources-num-cpus": os.cpu_count() or 1},
        )
        deadline, status = time.monotonic() + 300, ""
        while time.monotonic() < deadline and not status.startswith("finished"):
            time.sleep(2)
            status = link.run_status(run_id)
        logs = link.flwr("log", str(run_id), CONNECTION, "--show", timeout_s=60).stdout
        assert status == "finished:completed", logs[-3000:]
        assert f"({clients} simulated SuperNodes)" in logs  # Flower's own log of this run, federation config honoured
        assert "Installing application dependencies" not in logs and "uv sync" not in logs
    a, b = metrics(tmp_path / "inline"), metrics(run_dir)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra["bytes_up"] == rb["bytes_up"] and ra["bytes_down"] == rb["bytes_down"]
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


# -- engine: flower, through Flower's supported path or its fallback (fedsim.superlink.run) ---
FLOWER = ["runtime=ray", "runtime.engine=flower"]


@pytest.mark.parametrize(
    "strategy",
    [
        # FedBN: client state (local BN) kept in the run folder between rounds
        ["strategy.name=fedbn", "strategy.args={fraction_train: 0.5}"],
    ],
    ids=["fedbn"],
)
def test_flower_engine_runs_on_flowers_supported_path_and_agrees(toy_yaml, tmp_path, strategy, capfd, caplog):
    """``engine: flower`` with whole CPUs per client: fedsim's app on a private
    ``flower-superlink --simulation`` through ``flwr run`` (Flower's own log of the run,
    forwarded, shows its simulated SuperNodes and actor pool: the federation config's clients
    and client resources), inline's metrics, no dependency installation, no deprecation text,
    no fallback."""
    common = [*strategy, "runtime.num_threads=1"]
    assert main(["run", str(toy_yaml), *common, "--out", str(tmp_path / "inline")]) == 0
    capfd.readouterr()
    # The Python API with verbose=True leaves Flower's logger as the caller set it: Flower's
    # DEBUG lines of the run are then asked for (federation config's verbose) and forwarded.
    caplog.set_level(logging.DEBUG, logger="flwr")
    caplog.set_level(logging.DEBUG, logger="fedsim.runtime")
    fedsim_api.run(str(toy_yaml), [*common, *FLOWER, ONE_ACTOR], out=tmp_path / "flower", verbose=True)
    out, err = capfd.readouterr()
    assert "DEPRECATED FEATURE" not in out + err, (out + err)[-3000:]
    assert "fallback" not in err, err[-3000:]
    runtime = [r.getMessage() for r in caplog.records if r.name == "fedsim.runtime"]
    assert any(m.startswith("run ") and "submitted" in m for m in runtime), runtime
    flower = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert any("(8 simulated SuperNodes)" in m for m in flower), flower[-30:]
    assert any("Constructed ActorPool with: 1 actors" in m for m in flower), flower[-30:]
    assert not any("Installing application dependencies" in m or "uv sync" in m for m in flower)
    assert_agree(metrics(tmp_path / "inline"), metrics(tmp_path / "flower"))


def test_flower_engine_falls_back_to_run_simulation_with_its_reason(toy_yaml, tmp_path, capfd):
    """Half a CPU per client cannot be said in Flower's federation config (an integer): the
    run goes through ``run_simulation`` in this process, says why in one INFO line, prints no
    deprecation, and gives inline's metrics."""
    common = ["runtime.num_threads=1"]
    assert main(["run", str(toy_yaml), *common, "--out", str(tmp_path / "inline")]) == 0
    capfd.readouterr()
    assert (
        main(["run", str(toy_yaml), *common, *FLOWER, "runtime.cpus_per_client=0.5", "--out", str(tmp_path / "fb")])
        == 0
    )
    out, err = capfd.readouterr()
    assert "DEPRECATED FEATURE" not in out + err, (out + err)[-3000:]
    notes = [line for line in err.splitlines() if line.startswith("INFO: runtime ray")]
    assert notes == [
        "INFO: runtime ray: Flower's run_simulation (fallback), since runtime.cpus_per_client=0.5: Flower's "
        "federation config takes whole CPUs per client (client-resources-num-cpus is an integer)"
    ], err[-3000:]
    assert_agree(metrics(tmp_path / "inline"), metrics(tmp_path / "fb"))


def test_flower_engine_failure_is_one_line_and_leaves_nothing_running(tmp_path):
    """A run that fedsim stops (every client fails) on Flower's supported path: exit code 1,
    the RunFailure's one line (from the ServerApp in Flower's simulation process), no
    deprecation, and every process the SuperLink started is gone (conftest's token check)."""
    path = write_scenario(
        tmp_path / "s.yaml",
        rounds=2,
        runtime={"name": "ray", "engine": "flower", "cpus_per_client": os.cpu_count() or 1},
        faults={"failure_prob": 1.0, "max_round_retries": 0},
    )
    proc = fedsim("run", str(path), "--out", str(tmp_path / "run"))
    out, err = finish(proc, timeout=300)
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "round 1: only 0 of 8 clients succeeded" in errors[0], err[-3000:]
    assert "DEPRECATED FEATURE" not in out + err
    assert gone(proc.pid) == []


def test_flower_engine_kill_9_leaves_nothing_running_and_resumes(tmp_path):
    """``kill -9`` of ``fedsim run`` on Flower's supported path (no finally runs): its watchdog
    (fedsim.superlink.reaper) stops the SuperLink, SuperExec, flwr-simulation and the private
    Ray within seconds and removes the run's temporary folder; ``--resume`` finishes the run."""
    runtime = {"name": "ray", "engine": "flower", "cpus_per_client": os.cpu_count() or 1}
    path = write_scenario(tmp_path / "s.yaml", rounds=6, runtime=runtime)
    out = tmp_path / "run"
    proc = fedsim("run", str(path), "--out", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    test_token = os.environ[TEST_TOKEN_ENV]
    started = set(processes_with_token(test_token, env=TEST_TOKEN_ENV)) - {proc.pid}
    watchdogs = [p for p in started if b"fedsim.superlink.reaper" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(watchdogs) == 1 and len(started) >= 4, describe(list(started))  # + SuperLink, SuperExec, ...
    tmpdir = Path(Path(f"/proc/{watchdogs[0]}/cmdline").read_bytes().split(b"\0")[6].decode())
    assert tmpdir.is_dir()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 60
    while (left := processes_with_token(test_token, env=TEST_TOKEN_ENV)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], describe(left)
    assert not tmpdir.exists()
    done = metrics.read_text().count("\n")
    assert 1 <= done < 6
    resumed = fedsim("run", "--resume", str(out))
    _, err = finish(resumed, timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert metrics.read_text().count("\n") == 6
