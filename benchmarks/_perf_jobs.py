"""One measurement per process, for ``benchmarks.perf``.

    python -m benchmarks._perf_jobs JOB '{"overrides": [...], ...}'

Prints one line ``PERF_RESULT {json}``. Times are taken inside the process after its
imports (``work_s``); the caller also times the whole process (``process_s``). Every job
reports its own peak RSS (``resource.getrusage``), so measuring memory needs no sampling.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# light; fedsim's heavy modules are imported inside the jobs: the cli job must start as
# `fedsim run` does, with nothing heavy imported before the CLI's entry point
import numpy as np

TAG = "PERF_RESULT "


def rss_now() -> int:
    """Resident set size of this process now, in bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def emit(result: dict[str, Any]) -> None:
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(TAG + json.dumps(result), flush=True)


def scenario(args: dict[str, Any]):
    from fedsim.scenario import load_scenario

    return load_scenario(args.get("scenario", "scenarios/multidomain.yaml"), list(args.get("overrides", [])))


def _quiet() -> None:
    import logging

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for h in logging.getLogger("flwr").handlers:
        h.setLevel(logging.WARNING)


# -- fedsim, in-process API ---------------------------------------------------------------
def fedsim_run(args: dict[str, Any]) -> dict[str, Any]:
    """FederatedRun on the scenario's runtime (inline or ray); counts optimizer steps and
    records the end time of every round (checkpoint written)."""
    import fedsim.engine.server as server
    from fedsim.data import loading
    from fedsim.data.loading import num_clients
    from fedsim.engine.client import ClientRuntime
    from fedsim.engine.runtimes import RUNTIMES
    from fedsim.results import RunFolder
    from fedsim.scenario import new_run

    _quiet()
    memory = {"imports": rss_now()}
    t = time.perf_counter()
    sc = scenario(args)  # validation builds the dataset and the partitions (cached)
    scenario_s = time.perf_counter() - t
    memory["scenario"] = rss_now()
    # partitioning alone, timed again from scratch (the dataset stays cached)
    loading._partitions_cached.cache_clear()
    t = time.perf_counter()
    parts = loading.partitions(sc.data, sc.seed)
    partition_s = time.perf_counter() - t
    data_bytes = sum(
        int(getattr(a, "nbytes", 0))
        for split in loading.load_dataset(sc.data).domains.values()
        for a in vars(split).values()
    )
    partition_bytes = sum(v.nbytes for v in vars(parts).values() if isinstance(v, np.ndarray))
    counts = {"steps": 0, "data_built": 0}
    round_end: list[float] = []
    discover: dict[str, float] = {}
    orig_fit, orig_save, orig_discover = ClientRuntime._fit, server.save_checkpoint, server.PartitionGrid.discover

    def timed_discover(self, *a, **k):
        memory["nodes"] = rss_now()  # the runtime's per-node contexts exist by now
        t0 = time.perf_counter()
        orig_discover(self, *a, **k)
        discover["s"] = time.perf_counter() - t0
        memory["discovered"] = rss_now()

    def fit(self, *a, **k):  # inline only: Ray actors are other processes
        out = orig_fit(self, *a, **k)
        counts["steps"] += out[3]
        return out

    def save(*a, **k):
        orig_save(*a, **k)
        round_end.append(time.perf_counter())

    ClientRuntime._fit = fit  # type: ignore[method-assign]
    server.save_checkpoint = save  # type: ignore[assignment]
    server.PartitionGrid.discover = timed_discover  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory(prefix="fedsim-perf-") as tmp:
            run = RunFolder.create(Path(tmp) / "run", sc, overwrite=True)
            experiment = new_run(sc, run)
            t0 = time.perf_counter()
            RUNTIMES[sc.runtime.name](experiment)
            work = time.perf_counter() - t0
            records = run.read_metrics()
            clients_dir = run.path / "clients"
            state_clients = sorted(int(p.name) for p in clients_dir.iterdir()) if clients_dir.exists() else []
    finally:
        ClientRuntime._fit = orig_fit  # type: ignore[method-assign]
        server.save_checkpoint = orig_save  # type: ignore[assignment]
        server.PartitionGrid.discover = orig_discover  # type: ignore[method-assign]
    memory["end"] = rss_now()
    last = records[-1] if records else {}
    rounds = [b - a for a, b in zip([t0, *round_end[:-1]], round_end)]
    return {
        "work_s": work,
        "steps": counts["steps"],
        "accuracy": last.get("accuracy"),
        "round_s": rounds,
        "num_sampled": [r.get("strategy_metrics", {}).get("num_sampled") for r in records],
        "clients_with_state": len(state_clients),
        "num_clients": num_clients(sc.data),
        "scenario_s": scenario_s,  # loading + validating the scenario: dataset built, partitions made
        "partition_s": partition_s,
        "discover_s": discover.get("s"),
        "data_bytes": data_bytes,
        "partition_bytes": partition_bytes,
        "rss": memory,
    }


# -- `fedsim run` as the user runs it, with the times of its phases ---------------------------
def cli_run(args: dict[str, Any]) -> dict[str, Any]:
    """``fedsim run SCENARIO OVERRIDES`` through the CLI's own entry point; reports when
    round 1 started (epoch seconds: the caller knows when it launched this process), the
    rounds' wall times from metrics.jsonl (their sum is the round work) and, on the Ray
    pool, its one-line account of where the client calls ran."""
    import logging

    from fedsim.cli import main as cli_main  # light: the run command imports the rest, as `fedsim run` does

    _quiet()
    pool_lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("runtime ray (pool)"):
                pool_lines.append(record.getMessage())

    pool_log = logging.getLogger("fedsim.runtime")
    pool_log.setLevel(logging.INFO)
    pool_log.addHandler(Keep())
    with tempfile.TemporaryDirectory(prefix="fedsim-perf-cli-") as tmp:
        out = Path(tmp) / "run"
        # round 1 started when its metrics line appeared, less its wall time (the same on
        # every runtime; engine flower trains in another process)
        first_line: list[float] = []
        watching = threading.Event()

        def watch() -> None:
            metrics = out / "metrics.jsonl"
            while not watching.is_set() and not first_line:
                if metrics.exists() and metrics.stat().st_size > 0:
                    first_line.append(time.time())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = cli_main(
            ["run", args.get("scenario", "scenarios/multidomain.yaml"), *args["overrides"], "--out", str(out)]
        )
        watching.set()
        watcher.join()
        if code != 0:
            raise SystemExit(f"fedsim run exited {code}")
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    started = [first_line[0] - records[0]["wall_s"]]
    return {
        "first_round_at": started[0],
        "round_s": [r["wall_s"] for r in records],
        "round_work_s": sum(r["wall_s"] for r in records),
        "accuracy": records[-1]["accuracy"],
        "pool": pool_lines[-1] if pool_lines else "",
        "exited_at": time.time(),
    }


# -- bare loop and plain Flower ------------------------------------------------------------
def bare(args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks._perf_bare import bare_run

    sc = scenario(args)
    t0 = time.perf_counter()
    out = bare_run(sc)
    out["work_s"] = time.perf_counter() - t0
    return out


def flower(args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks._perf_flower import run_flower

    _quiet()
    sc = scenario(args)
    t0 = time.perf_counter()
    run_flower(sc)
    return {"work_s": time.perf_counter() - t0}


# -- test-time adaptation, per batch ---------------------------------------------------------
def tta(args: dict[str, Any]) -> dict[str, Any]:
    import copy
    import statistics

    import torch
    import torch.nn.functional as F

    from fedsim.adapters.alpha_bn import AlphaBN
    from fedsim.adapters.cema import CEMA
    from fedsim.adapters.tbn import TBN
    from fedsim.adapters.unmix_tns import UnMixTNS
    from fedsim.config import DataConfig
    from fedsim.data.loading import load_dataset, to_tensor
    from fedsim.models import build_model

    torch.set_num_threads(int(args.get("threads", 1)))
    device = torch.device(args.get("device", "cpu"))
    batch, reps, per_rep = int(args.get("batch", 64)), int(args.get("reps", 7)), int(args.get("batches", 20))
    ds = load_dataset(DataConfig(**args.get("data", {})))
    names = list(ds.domains)
    src = ds.domains[names[0]]
    width = int(args.get("width", 32))
    model = build_model("cnn-small", ds.num_classes, ds.channels, ds.image_size, "bn", {"width": width}, seed=0)
    # a briefly trained source model, so that BN statistics and CEMA's entropies are realistic
    x_tr, y_tr = to_tensor(np.asarray(src.x_train)), torch.as_tensor(np.asarray(src.y_train), dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(int(args.get("train_steps", 60))):
        idx = torch.randint(0, len(y_tr), (32,), generator=g)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().to(device)
    tgt = ds.domains["svhn" if "svhn" in ds.domains else names[-1]]
    x_te = to_tensor(np.asarray(tgt.x_test)).to(device)
    batches = [x_te[i : i + batch] for i in range(0, len(x_te) - batch + 1, batch)]
    foundation = (
        build_model("cnn-small", ds.num_classes, ds.channels, ds.image_size, "bn", {"width": 2 * width}, seed=1)
        .eval()
        .to(device)
    )
    plain = copy.deepcopy(model).eval()

    def plain_step(x):
        with torch.no_grad():
            return plain(x)

    adapters = {
        "alpha_bn": AlphaBN(model, a=0.1),
        "unmix_tns": UnMixTNS(model, num_components=16),
        # edge only, official default normalization (tbr: BatchRenorm, running statistics
        # set by the first batch): the cloud runs when `cloud_batch` uploads are pending,
        # which never happens here; the pending uploads are dropped after each timed batch.
        "cema_edge": CEMA(model, foundation=foundation, cloud_batch=10**9, extra_replay_size=0, normalization="tbr"),
        # the same edge uploading every sample: bounds what the uint8 packing can add
        "cema_edge_upload_all": CEMA(
            model, foundation=foundation, cloud_batch=10**9, extra_replay_size=0, upload_all=True
        ),
        # the edge keeping the source statistics (normalization: source): forward + filter only
        "cema_edge_source_bn": CEMA(
            model, foundation=foundation, cloud_batch=10**9, extra_replay_size=0, normalization="source"
        ),
        # test-batch normalization alone: the statistics pass CEMA's default edge shares
        "tbn": TBN(model),
    }
    steps = {"plain": plain_step, **{k: a.predict_and_adapt for k, a in adapters.items()}}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(name: str) -> float:
        fn = steps[name]
        total = 0.0
        for i in range(per_rep):
            x = batches[i % len(batches)]
            sync()
            t0 = time.perf_counter()
            fn(x)
            sync()
            total += time.perf_counter() - t0
            if name.startswith("cema_edge"):
                adapters[name].cloud.pending.clear()
        return total / per_rep

    for name in steps:  # warm-up
        for _ in range(3):
            timed(name)
    per_batch: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {k: [] for k in adapters}
    for _ in range(reps):  # interleaved: plain A, then each adapter, then plain B
        a = timed("plain")
        row = {k: timed(k) for k in adapters}
        b = timed("plain")
        base = (a + b) / 2
        per_batch["plain"].append(base)
        for k, v in row.items():
            per_batch[k].append(v)
            ratios[k].append(v / base)
    cema, cema_all = adapters["cema_edge"], adapters["cema_edge_upload_all"]
    return {
        "batch": batch,
        "per_batch_ms": {k: 1000 * statistics.median(v) for k, v in per_batch.items()},
        "ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "ratios_all": ratios,
        "cema_upload_fraction": cema.metrics()["upload_fraction"],
        "cema_cloud_steps": cema.metrics()["cloud_steps"],
        "cema_all_upload_fraction": cema_all.metrics()["upload_fraction"],
    }


# -- issue #19 target 5: vectorized cohorts ---------------------------------------------------
def cohort(args: dict[str, Any]) -> dict[str, Any]:
    """A run on the inline runtime (``runtime.vectorize`` as the overrides say) that times
    every training round's message exchange: each client loaded, trained and replied (what
    training the cohort costs; aggregation, evaluation and checkpoints are outside).
    ``save``: a path to write the final global arrays to (.npz), to compare the two sides."""
    from flwr.app import MessageType

    import fedsim.engine.server as server
    from fedsim.data.loading import num_clients
    from fedsim.engine.checkpoint import load_latest
    from fedsim.engine.runtimes import run_inline
    from fedsim.results import RunFolder
    from fedsim.scenario import new_run

    _quiet()
    sc = scenario(args)
    train_s: list[float] = []
    steps: list[int] = []
    orig = server.PartitionGrid.send_and_receive

    def timed(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return orig(self, messages, timeout=timeout)
        t0 = time.perf_counter()
        replies = orig(self, messages, timeout=timeout)
        train_s.append(time.perf_counter() - t0)
        steps.append(sum(int(r.content["metrics"]["train_steps"]) for r in replies if r.has_content()))
        return replies

    server.PartitionGrid.send_and_receive = timed  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory(prefix="fedsim-perf-") as tmp:
            run = RunFolder.create(Path(tmp) / "run", sc, overwrite=True)
            experiment = new_run(sc, run)
            run_inline(experiment)
            arrays = load_latest(run.checkpoints).arrays
    finally:
        server.PartitionGrid.send_and_receive = orig  # type: ignore[method-assign]
    if args.get("save"):
        np.savez(args["save"], **arrays)
    grid = experiment.grid.inner if experiment.grid is not None else None
    return {
        "train_s": train_s,
        "steps": steps,
        "batch_size": sc.client.batch_size,
        "clients": num_clients(sc.data),
        "cohorts": list(getattr(grid, "cohorts", [])),
        "fallbacks": list(getattr(grid, "fallbacks", [])),
    }


JOBS = {"fedsim": fedsim_run, "cli": cli_run, "bare": bare, "flower": flower, "tta": tta, "cohort": cohort}


def main() -> None:
    job, raw = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "{}")
    emit(JOBS[job](json.loads(raw)))


if __name__ == "__main__":
    main()
